"""The embedded sample corpus: Pile-format training data built from what every machine has.

Two components, written as Pile-style jsonl.zst lines `{"text": ..., "meta": {"pile_set_name": ...}}`:

- `Github`: the Python standard library's own `.py` files, found through `sysconfig` so no download
  is needed, cut into documents of at most `GITHUB_PIECE_BYTES` at top-level statement boundaries
  (`code_pieces`): stdlib files range from a few bytes to 100s of KB, and with whole files a
  document range (a split) could hold a tenth or ten times the Github share of the tokens. The exact text depends on the Python build, so the corpus
  is deterministic per seed *on a given interpreter*.
- `BioS`: synthetic biographies in the style of "Physics of Language Models, Part 3.3"
  (Allen-Zhu & Li, 2024): every invented person has a unique full name and six attributes (birth
  date, birth city, university, major, employer, employer city); each person gets several bios, each
  written with randomly chosen sentence templates in a random sentence order ("bioS multi" +
  "permute" in the paper). `bios_facts.jsonl` lists the ground truth so a trained model's knowledge
  can be probed later.

Documents of both components are interleaved evenly (see `even_interleave`): any stretch of the
file -- the last 5% that a "949,50,1" split makes the validation set, say -- holds each component
in its overall proportion, so train and valid losses measure the same mixture.
"""
from __future__ import annotations

import io
import json
import os
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import zstandard

from megatron_neox.durable import atomic_paths
from megatron_neox.errors import ConfigError, DataError

MB = 1_000_000  # sizes are reported in decimal megabytes, like the MB/s of preprocessing
CORPUS_FILE = "sample.jsonl.zst"
FACTS_FILE = "bios_facts.jsonl"
GITHUB, BIOS = "Github", "BioS"  # pile_set_name values; "Github" is the Pile's own spelling

# ---------------------------------------------------------------------------------------------
# Github: the standard library's Python sources
# ---------------------------------------------------------------------------------------------

# Third-party packages live inside the stdlib tree on most installs; they are not "what every
# machine has", and including them would make the corpus depend on what happens to be installed.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_python_files(stdlib_dir: str | None = None) -> list[Path]:
    """Every `.py` file of the standard library, sorted by relative path (stable across runs)."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ConfigError(f"standard library directory {root} (from sysconfig) does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def github_documents(rng: random.Random, stdlib_dir: str | None = None) -> Iterator[str]:
    """Stdlib sources in a seeded order, so a small size cap still samples the whole library
    rather than only the alphabetically first packages."""
    files = stdlib_python_files(stdlib_dir)
    rng.shuffle(files)
    for path in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue  # a few test fixtures are deliberately in legacy encodings
        except OSError:
            continue  # unreadable file: skipping keeps the corpus buildable anywhere
        yield from (piece for piece in code_pieces(text) if piece.strip())


GITHUB_PIECE_BYTES = 4096  # at most this many bytes per Github document (a longer line stays whole)


def code_pieces(text: str, limit: int = GITHUB_PIECE_BYTES) -> list[str]:
    """`text` cut into consecutive pieces of at most `limit` UTF-8 bytes, at the start of a
    top-level line (no indentation) where one is in reach, else at any line. Joined they give
    `text` back."""
    pieces, current, size, cut_at = [], [], 0, None  # cut_at: index in `current` of the last good start
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if current and size + n > limit:
            k = cut_at if cut_at else len(current)
            pieces.append("".join(current[:k]))
            current = current[k:]
            size, cut_at = sum(len(x.encode("utf-8")) for x in current), None
        if current and line[:1] not in (" ", "\t", "\n", "\r", ")", "]", "}", "#"):
            cut_at = len(current)
        current.append(line)
        size += n
    if current:
        pieces.append("".join(current))
    return pieces


# ---------------------------------------------------------------------------------------------
# BioS: synthetic biographies
# ---------------------------------------------------------------------------------------------

_FIRST_FEMALE = (
    "Abigail Ada Adele Agnes Alba Alma Amara Anika Annika Aria Astrid Aurelia Beatrix Bianca Brielle "
    "Calla Camila Carys Cecily Celeste Clara Cora Daphne Delia Eden Elena Elodie Elsa Esme Farah "
    "Fiona Flora Freya Gemma Greta Hazel Helena Imogen Ingrid Iris Isla Ivy Jasmine Juniper Kaia "
    "Keira Lana Leona Liora Lucia Lydia Maeve Maren Marisol Mila Mira Nadia Naomi Nell Noor Odette "
    "Opal Orla Paloma Petra Phoebe Priya Quinn Rhea Rosalind Sabine Selma Sienna Solene Talia Tamsin "
    "Thea Uma Valeria Vera Willa Xenia Yara Yvette Zara Zelda Zofia"
).split()
_FIRST_MALE = (
    "Aaron Adrian Alaric Alden Ambrose Anders Anton Arlo Arturo Barnaby Basil Bram Caspian Cedric "
    "Cillian Clement Cormac Dario Declan Dmitri Dorian Elias Emeric Ennis Ezra Felix Fintan Florian "
    "Gideon Gustav Hamish Hector Idris Ignatius Isak Jago Jasper Joaquin Jonas Kasimir Kenji Lachlan "
    "Leander Linus Lorcan Lucian Magnus Malik Matthias Milo Nikolai Niall Oren Orrin Osric Pascal "
    "Percival Quentin Rafael Ramon Rohan Rufus Sami Silas Soren Stellan Tariq Teodor Thaddeus Tobias "
    "Ulric Vidar Viggo Wendell Wilder Xavier Yannick Yusuf Zane Zephyr"
).split()
_MIDDLE = (
    "Adair Blake Briar Brook Carson Dale Drew Ellis Emery Finley Gray Harper Hayden Jules Kai Lane "
    "Lee Marlow Morgan Noel Oakley Paris Reese Remy Riley Rowan Sage Shea Sloane Tate Wren Arden "
    "Avery Bellamy Campbell Darcy Eames Fallon Garnet Hollis Indigo Jordan Kendall Lennox Merritt"
).split()
_LAST = (
    "Abernathy Achterberg Aldana Alvarado Ashdown Balogun Barrientos Beaumont Bergqvist Blackwood "
    "Bramwell Calloway Carrington Castellanos Chatterjee Cheverton Culpepper Dalgleish Delacroix "
    "Dunmore Eberhardt Ellingham Escobedo Fairbanks Falkenrath Fenwick Fitzgerald Galloway Garber "
    "Gillingham Greenhalgh Halvorsen Hargreaves Hawthorne Holloway Huxley Ibarra Ishikawa Jablonski "
    "Kaminski Karlsson Kowalczyk Lachance Lindqvist Lockhart Lombardi Machado Mandelbaum Marchetti "
    "Montgomery Nakamura Navarro Nightingale Okafor Olafsson Ostrowski Pemberton Pendleton Quintero "
    "Radcliffe Ravensworth Rosenthal Sandoval Santangelo Sedgwick Sorensen Stanhope Szymanski "
    "Thackeray Thornbury Underwood Valdivia Vanderberg Villanueva Wainwright Whitlock Winterbourne "
    "Yamaguchi Zabrowski Zamora Zeller"
).split()

_CITIES = (
    "Albuquerque, NM", "Anchorage, AK", "Ann Arbor, MI", "Asheville, NC", "Austin, TX",
    "Baltimore, MD", "Boise, ID", "Boulder, CO", "Burlington, VT", "Charleston, SC",
    "Chattanooga, TN", "Cheyenne, WY", "Cleveland, OH", "Des Moines, IA", "Duluth, MN",
    "El Paso, TX", "Eugene, OR", "Fargo, ND", "Flagstaff, AZ", "Fresno, CA", "Gainesville, FL",
    "Green Bay, WI", "Honolulu, HI", "Ithaca, NY", "Juneau, AK", "Kansas City, MO",
    "Knoxville, TN", "Lexington, KY", "Lincoln, NE", "Little Rock, AR", "Madison, WI",
    "Memphis, TN", "Missoula, MT", "Mobile, AL", "Nashville, TN", "New Haven, CT",
    "New Orleans, LA", "Norfolk, VA", "Oklahoma City, OK", "Omaha, NE", "Portland, ME",
    "Providence, RI", "Provo, UT", "Reno, NV", "Richmond, VA", "Rochester, NY", "Sacramento, CA",
    "Salem, OR", "Santa Fe, NM", "Savannah, GA", "Scranton, PA", "Sioux Falls, SD",
    "Spokane, WA", "Springfield, IL", "Syracuse, NY", "Tallahassee, FL", "Tucson, AZ",
    "Tulsa, OK", "Wichita, KS", "Wilmington, DE",
)
_UNIVERSITIES = (
    "Amherst College", "Boston University", "Brandeis University", "Brown University",
    "Carnegie Mellon University", "Case Western Reserve University", "Columbia University",
    "Cornell University", "Dartmouth College", "Duke University", "Emory University",
    "Georgetown University", "Georgia Institute of Technology", "Harvard University",
    "Johns Hopkins University", "Massachusetts Institute of Technology", "New York University",
    "Northwestern University", "Ohio State University", "Pennsylvania State University",
    "Princeton University", "Purdue University", "Rice University", "Rutgers University",
    "Stanford University", "Tufts University", "Tulane University",
    "University of California, Berkeley", "University of Chicago", "University of Florida",
    "University of Illinois at Urbana-Champaign", "University of Michigan",
    "University of North Carolina at Chapel Hill", "University of Pennsylvania",
    "University of Texas at Austin", "University of Washington", "University of Wisconsin-Madison",
    "Vanderbilt University", "Washington University in St. Louis", "Yale University",
)
_MAJORS = (
    "Accounting", "Aerospace Engineering", "Anthropology", "Applied Mathematics", "Architecture",
    "Astronomy", "Biochemistry", "Biomedical Engineering", "Chemical Engineering", "Chemistry",
    "Civil Engineering", "Classics", "Cognitive Science", "Communications", "Computer Science",
    "Economics", "Electrical Engineering", "English Literature", "Environmental Science",
    "Film Studies", "Finance", "Geology", "History", "Industrial Design", "Journalism",
    "Linguistics", "Marine Biology", "Materials Science", "Mathematics", "Mechanical Engineering",
    "Music Theory", "Neuroscience", "Nursing", "Philosophy", "Physics", "Political Science",
    "Psychology", "Public Health", "Sociology", "Statistics",
)
# Each employer has one headquarters: in the paper the work city is a function of the company.
_EMPLOYERS = (
    ("Aldergrove Analytics", "Austin, TX"), ("Bluefin Robotics", "Boston, MA"),
    ("Brightwater Energy", "Houston, TX"), ("Cedar Ridge Bank", "Charlotte, NC"),
    ("Coral Bay Pharmaceuticals", "San Diego, CA"), ("Crestline Aerospace", "Seattle, WA"),
    ("Driftwood Media", "Los Angeles, CA"), ("Evergreen Logistics", "Memphis, TN"),
    ("Fernhill Foods", "Minneapolis, MN"), ("Foxglove Software", "San Francisco, CA"),
    ("Granite Peak Insurance", "Hartford, CT"), ("Harborlight Shipping", "Baltimore, MD"),
    ("Ironbark Construction", "Denver, CO"), ("Juniper Health Systems", "Nashville, TN"),
    ("Kestrel Semiconductors", "San Jose, CA"), ("Lakeshore Motors", "Detroit, MI"),
    ("Larkspur Biotech", "Cambridge, MA"), ("Meridian Airlines", "Atlanta, GA"),
    ("Northwind Textiles", "Charlotte, NC"), ("Oakhaven Publishing", "New York, NY"),
    ("Pinecrest Telecom", "Dallas, TX"), ("Quarry Lane Capital", "Chicago, IL"),
    ("Redwood Instruments", "Portland, OR"), ("Saltmarsh Chemicals", "Wilmington, DE"),
    ("Silverleaf Consulting", "Washington, DC"), ("Stonebridge Steel", "Pittsburgh, PA"),
    ("Tidewater Utilities", "Richmond, VA"), ("Timberline Outfitters", "Salt Lake City, UT"),
    ("Upland Agriculture", "Des Moines, IA"), ("Verdant Materials", "Cleveland, OH"),
    ("Willowmere Hotels", "Orlando, FL"), ("Yarrow Games", "Raleigh, NC"),
)
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)

# Several phrasings per attribute (the paper uses ~50 each; a handful already forces the model to
# separate the fact from its wording). {s} is the subject (full name or pronoun), {p} the
# possessive, {v} the value.
BIO_TEMPLATES = {
    "birth_date": (
        "{s} was born on {v}.",
        "{s} came into this world on {v}.",
        "{S_p} birthday falls on {v}.",
        "{s} celebrates {p} birthday on {v}.",
        "{s} entered life on {v}.",
        "The birth of {s} took place on {v}.",
    ),
    "birth_city": (
        "{s} was born in {v}.",
        "{s} spent {p} early years in {v}.",
        "{s} originated from {v}.",
        "{S_p} birthplace is {v}.",
        "{s} grew up in {v}.",
        "{s} was brought up in {v}.",
    ),
    "university": (
        "{s} studied at {v}.",
        "{s} received mentorship and guidance from faculty members at {v}.",
        "{s} graduated from {v}.",
        "{s} completed {p} education at {v}.",
        "{s} attended {v}.",
        "{s} earned a degree from {v}.",
    ),
    "major": (
        "{s} majored in {v}.",
        "{s} focused {p} studies on {v}.",
        "{s} developed a deep interest in {v} during college.",
        "{S_p} field of study was {v}.",
        "{s} pursued a degree in {v}.",
        "{s} specialized in {v}.",
    ),
    "employer": (
        "{s} works for {v}.",
        "{s} is employed by {v}.",
        "{s} holds a position at {v}.",
        "{s} has a job at {v}.",
        "{S_p} employer is {v}.",
        "{s} joined the staff of {v}.",
    ),
    "employer_city": (
        "{s} works in {v}.",
        "{s} is based in {v} for work.",
        "{S_p} office is located in {v}.",
        "{s} commutes to an office in {v}.",
        "{s} lives and works in {v}.",
        "{s} has a career in {v}.",
    ),
}
ATTRIBUTES = tuple(BIO_TEMPLATES)  # the six facts, in the order bios_facts.jsonl lists them


@dataclass
class Person:
    name: str
    female: bool
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str

    def facts(self) -> dict:
        return {"name": self.name, **{a: getattr(self, a) for a in ATTRIBUTES}}


class PersonFactory:
    """Draws people with unique full names (first x middle x last: ~600k combinations)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def new_person(self) -> Person:
        rng = self.rng
        for _ in range(1000):
            female = rng.random() < 0.5
            first = rng.choice(_FIRST_FEMALE if female else _FIRST_MALE)
            name = f"{first} {rng.choice(_MIDDLE)} {rng.choice(_LAST)}"
            if name not in self.used:
                break
        else:
            raise ConfigError("the BioS name pools are exhausted; lower --size-mb")
        self.used.add(name)
        # Date ranges follow the paper (years 1900-2099, days 1-28 so every month is valid).
        date = f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(1900, 2099)}"
        employer, employer_city = rng.choice(_EMPLOYERS)
        return Person(name, female, date, rng.choice(_CITIES), rng.choice(_UNIVERSITIES),
                      rng.choice(_MAJORS), employer, employer_city)


def write_bio(person: Person, rng: random.Random) -> str:
    """One biography: the six facts in a random order with random templates. The first sentence
    names the person in full, later ones mostly use the pronoun (as in the paper's bioS)."""
    pronoun, possessive = ("She", "her") if person.female else ("He", "his")
    order = list(ATTRIBUTES)
    rng.shuffle(order)
    sentences = []
    for i, attr in enumerate(order):
        full = i == 0 or rng.random() < 0.15
        subject = person.name if full else pronoun
        subject_poss = f"{person.name}'s" if full else possessive.capitalize()
        template = rng.choice(BIO_TEMPLATES[attr])
        sentence = template.format(s=subject, p=possessive, S_p=subject_poss, v=getattr(person, attr))
        sentences.append(sentence[0].upper() + sentence[1:])
    return " ".join(sentences)


def bios_documents(rng: random.Random, bios_per_person: int, chunk_people: int = 512
                   ) -> Iterator[tuple[Person, str]]:
    """Endless (person, bio) pairs.

    People are made in chunks whose bios are shuffled together, so a person's bios are spread
    out: adjacent copies would let a model copy from its context instead of storing the fact.
    """
    factory = PersonFactory(rng)
    while True:
        chunk = []
        for _ in range(chunk_people):
            person = factory.new_person()
            chunk.extend((person, write_bio(person, rng)) for _ in range(bios_per_person))
        rng.shuffle(chunk)
        yield from chunk


# ---------------------------------------------------------------------------------------------
# The corpus file
# ---------------------------------------------------------------------------------------------


@dataclass
class ComponentStats:
    docs: int = 0
    bytes: int = 0


@dataclass
class CorpusSummary:
    corpus_path: Path
    facts_path: Path
    people: int
    components: dict[str, ComponentStats] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.components.values())


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def even_interleave(counts: dict[str, int]) -> list[str]:
    """Component names in file order: the i-th of n documents of a component sits at fraction
    (i + 1/2) / n of the file, so every prefix, and every window, holds each component within
    about one document of its share. (A draw weighted by bytes left, as before, spent the few
    large Github files early and left the validation tail of the demo corpus without any.)"""
    keyed = [((i + 0.5) / n, c, name) for c, (name, n) in enumerate(counts.items()) for i in range(n)]
    return [name for _, _, name in sorted(keyed)]


def make_sample_corpus(out_dir: str | os.PathLike, size_mb: float = 8.0, seed: int = 1234,
                       github_fraction: float = 0.5, bios_per_person: int = 5,
                       stdlib_dir: str | None = None, chunk_people: int = 512) -> CorpusSummary:
    """Write `out_dir/sample.jsonl.zst` and `out_dir/bios_facts.jsonl`; both appear together,
    complete, or not at all (temporary names, renamed at the end).

    `size_mb` caps the total text (UTF-8 bytes of all documents). `github_fraction` of it goes
    to stdlib sources; when the stdlib is smaller than that share, bios fill the rest.
    `bios_facts.jsonl` holds one line per person with at least one bio in the corpus: the name,
    the six attributes and `bios`, how many of their bios made it under the size cap.
    `chunk_people`: people whose bios are shuffled together (see `bios_documents`); a small
    corpus with every bio of every person needs a size cap near a multiple of a small chunk.
    """
    if size_mb <= 0:
        raise ConfigError(f"--size-mb must be positive, got {size_mb}")
    if not 0.0 <= github_fraction <= 1.0:
        raise ConfigError(f"github_fraction must be in [0, 1], got {github_fraction}")
    if bios_per_person < 1:
        raise ConfigError(f"bios_per_person must be >= 1, got {bios_per_person}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = int(size_mb * MB)

    # Independent streams per component: the Github share does not change which people are drawn.
    rng_github, rng_bios = (random.Random(f"{seed}:{part}") for part in ("github", "bios"))
    github, github_bytes = [], 0
    for text in github_documents(rng_github, stdlib_dir):
        n = _utf8_len(text)
        if github_bytes + n <= total * github_fraction:  # skip a file too big for what is left
            github.append(text)
            github_bytes += n
    bios_budget = total - github_bytes

    bios, bios_bytes = [], 0
    for person, text in bios_documents(rng_bios, bios_per_person, chunk_people):
        n = _utf8_len(text)
        if bios_bytes + n > bios_budget:
            break
        bios.append((person, text))
        bios_bytes += n

    stats = {GITHUB: ComponentStats(), BIOS: ComponentStats()}
    people: dict[str, tuple[Person, int]] = {}  # insertion order = order people first appear
    corpus_path, facts_path = out / CORPUS_FILE, out / FACTS_FILE
    # The facts first: whoever finds the corpus finds the facts that go with it.
    with atomic_paths(facts_path, corpus_path) as (facts_tmp, corpus_tmp):
        with open(corpus_tmp, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as zf:
            docs = {GITHUB: iter(github), BIOS: iter(bios)}
            for name in even_interleave({GITHUB: len(github), BIOS: len(bios)}):
                if name == GITHUB:
                    text = next(docs[GITHUB])
                else:
                    person, text = next(docs[BIOS])
                    people[person.name] = (person, people.get(person.name, (person, 0))[1] + 1)
                stats[name].docs += 1
                stats[name].bytes += _utf8_len(text)
                line = json.dumps({"text": text, "meta": {"pile_set_name": name}}, ensure_ascii=False)
                zf.write(line.encode("utf-8") + b"\n")
        with open(facts_tmp, "w", encoding="utf-8") as f:
            for person, n_bios in people.values():
                f.write(json.dumps({**person.facts(), "bios": n_bios}, ensure_ascii=False) + "\n")
    return CorpusSummary(corpus_path, facts_path, len(people), stats)


def check_facts_file(path: str | os.PathLike) -> None:
    """A facts file (bios_facts.jsonl) must hold at least one record: a probe over none is no result."""
    with open(path, encoding="utf-8") as f:
        if not any(line.strip() for line in f):
            raise DataError(f"{path}: no facts (an empty file); expected one JSON object per line, as "
                            "tools/make_sample_corpus.py writes in bios_facts.jsonl")


def iter_corpus(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(text, pile_set_name) of every line of a sample corpus file."""
    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as zf:
        for line in io.TextIOWrapper(zf, encoding="utf-8"):
            obj = json.loads(line)
            yield obj["text"], obj["meta"]["pile_set_name"]
