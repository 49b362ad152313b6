"""Rebuild the bundled sample corpus from public packages.

    apt-get install dict-gcide                  # Webster 1913 prose, /usr/share/dictd/gcide.dict.dz
    pip install scikit-image matplotlib         # photographs (matplotlib only for grace_hopper.jpg)
    python examples/data/build_sample.py        # writes next to this file

Outputs (all under examples/data/):
  textbook_sample.jsonl   lecture-like documents in the Multimodal-Textbook / OBELICS layout
  mmc4_sample.json        a JSON list of MMC4-layout documents using the same photographs
  text_sample.jsonl       text-only documents (the lectures' transcripts, no images) for blends
  images/                 the photographs as JPEG at native size (plus a few keyframe crops)
  bad/bad.jsonl, bad/images/   deliberately broken input for the error report

The build is deterministic (fixed crop boxes, fixed document scripts, dicts built in a fixed
order). JPEG bytes depend on the libjpeg inside Pillow, so the same Pillow wheel gives
identical files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"
GCIDE_DIR = Path("/usr/share/dictd")
JPEG_QUALITY = 90
TOKENS_PER_IMAGE = 576  # CLIP ViT-L/14-336 patches; only used for the seed's `token_num` field


# ----------------------------------------------------------------------------------------------
# Prose: GCIDE (dictd format). We keep only passages whose source tag says they come from the
# 1913 Webster (or its 1913 supplement), which is in the public domain; GCIDE's own later
# additions (WordNet, PJC) are GPL and are skipped.
# ----------------------------------------------------------------------------------------------

PUBLIC_DOMAIN_TAGS = {"1913 Webster", "Webster 1913 Suppl."}
SOURCE_TAG = re.compile(r"^[ \t]*\[([^\[\]\n]+)\][ \t]*$", re.M)
# GCIDE writes accented letters as ASCII markup, e.g. ["o] for o-umlaut, [e^] for e-breve.
DIACRITIC = {'"': "\u0308", "=": "\u0304", "^": "\u0306", "'": "\u0301", "`": "\u0300",
             "~": "\u0303", ".": "\u0323", "-": "\u0304", ",": "\u0327", "*": "\u030a"}
PART_OF_SPEECH = r"(?:n|v|a|adv|prep|pl|p|t|i|imp|pr|interj|conj|sing|superl|compar)\."


def _b64(s: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for ch in s:
        value = value * 64 + alphabet.index(ch)
    return value


def _accents(text: str) -> str:
    for markup, plain in (("[ae]", "ae"), ("[AE]", "Ae"), ("[oe]", "oe"), ("[OE]", "Oe")):
        text = text.replace(markup, plain)

    def letter(m: re.Match) -> str:
        before, ch, after = m.groups()
        if bool(before) == bool(after):  # [R.] is a usage label, not an accent
            return m.group(0)
        return unicodedata.normalize("NFC", ch + DIACRITIC[before or after])

    return re.sub(r"\[([\"=^'`~.,*-]?)([A-Za-z])(\^?)\]", letter, text)


def _drop_brackets(text: str) -> str:
    """Remove balanced [...] groups (etymologies, usage labels), which may nest."""
    out, depth = [], 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def _clean(chunk: str, first: bool) -> str | None:
    text = _accents(chunk)
    text = re.sub(r"\[[a-z^\"=.'`~,*-]{1,5}\]", "\x00", text)  # markup we cannot render
    text = re.sub(r"\\[^\\\n]*\\", " ", text)  # \pro*nun"ci*a`tion\
    text = _drop_brackets(text).replace("{", "").replace("}", "")
    text = re.sub(r"\s+", " ", text).strip()
    if first:  # headword, pronunciation and part of speech at the start of an entry
        text = re.sub(rf"^[A-Za-z' -]+?\s*(\([^)]*\))?\s*,?\s*({PART_OF_SPEECH}\s*[;&]?\s*)+", "", text)
    text = re.sub(r"^(\d+\.|\([a-z]\))\s*", "", text)
    text = re.sub(r"\s(\d+\.|\([a-z]\))\s", " ", text)
    text = re.sub(r"^Note: ", "", text)
    if len(text) < 30 or re.search(r"[\x00\\{}\[\]<>|~^]", text):
        return None
    return text


class Gcide:
    def __init__(self, root: Path = GCIDE_DIR):
        dict_path, index_path = root / "gcide.dict.dz", root / "gcide.index"
        if not dict_path.exists():
            raise SystemExit(f"{dict_path} not found: install Debian's dict-gcide package")
        self.data = gzip.open(dict_path).read()  # dictzip is gzip-compatible
        self.index: dict[str, list[tuple[int, int]]] = {}
        for line in index_path.read_text(encoding="utf-8").splitlines():
            word, offset, length = line.split("\t")
            self.index.setdefault(word.lower(), []).append((_b64(offset), _b64(length)))

    def senses(self, word: str) -> list[str]:
        out = []
        for offset, length in self.index.get(word.lower(), []):
            raw = self.data[offset:offset + length]
            try:
                entry = raw.decode("utf-8")
            except UnicodeDecodeError:
                entry = raw.decode("cp1252")
            parts = SOURCE_TAG.split(entry)  # text, tag, text, tag, ...
            for k in range(0, len(parts) - 1, 2):
                if parts[k + 1].strip() in PUBLIC_DOMAIN_TAGS:
                    sense = _clean(parts[k], first=(k == 0))
                    if sense:
                        out.append(sense)
        return out

    def sense(self, word: str, needle: str) -> str:
        """The first public-domain sense of `word` that contains `needle`."""
        for sense in self.senses(word):
            if needle in sense:
                return sense
        raise SystemExit(f"GCIDE: no 1913 Webster sense of {word!r} contains {needle!r}")


# ----------------------------------------------------------------------------------------------
# Photographs. Each entry: file name under images/, package, file inside the package, license,
# caption (what a slide showing it would say; used as the OCR text).
# ----------------------------------------------------------------------------------------------

PHOTOS = {
    "astronaut": ("skimage", "astronaut.png", "public domain (NASA)", "Astronaut Eileen Collins."),
    "camera": ("skimage", "camera.png", "CC0 (Lav Varshney)", "A photographer at work."),
    "chelsea": ("skimage", "chelsea.png", "CC0 (Stefan van der Walt)", "Chelsea the cat."),
    "coffee": ("skimage", "coffee.png", "CC0 (Rachel Michetti)", "Coffee cup."),
    "coins": ("skimage", "coins.png", "no known copyright restrictions (Brooklyn Museum)",
              "Greek coins from Pompeii."),
    "hubble_deep_field": ("skimage", "hubble_deep_field.jpg", "public domain (NASA)",
                          "Hubble eXtreme Deep Field."),
    "retina": ("skimage", "retina.jpg", "CC0 (Mikael Häggström)", "Human retina."),
    "rocket": ("skimage", "rocket.jpg", "public domain (SpaceX)",
               "Launch photo of DSCOVR on Falcon 9 by SpaceX."),
    "motorcycle_left": ("skimage", "motorcycle_left.png", "Middlebury 2014 stereo benchmark",
                        "Stereo pair, left view."),
    "motorcycle_right": ("skimage", "motorcycle_right.png", "Middlebury 2014 stereo benchmark",
                         "Stereo pair, right view."),
    "moon": ("skimage", "moon.png", "scikit-image BSD-3-Clause", "Surface of the moon."),
    "page": ("skimage", "page.png", "scikit-image BSD-3-Clause",
             # the text printed on the photographed page
             "Region-based segmentation Let us first determine markers of the coins and the "
             "background. These markers are pixels that we can label unambiguously as either "
             "object or background. Here, the markers are found at the two extreme parts of the "
             "histogram of grey values: >>> markers = np.zeros_like(coins)"),
    "text": ("skimage", "text.png", "public domain (Wikipedia)", "Handwritten equations."),
    "clock": ("skimage", "clock_motion.png", "public domain (Stefan van der Walt)",
              "Motion blurred clock."),
    "immunohistochemistry": ("skimage", "ihc.png", "no known copyright restrictions (CMMI)",
                             "Immunohistochemical staining with hematoxylin counterstaining."),
    "cell": ("skimage", "cell.png", "CC0 (Paul Müller)", "Cell floating in saline."),
    "brick": ("skimage", "brick.png", "CC0 (CC0Textures)", "Brick wall."),
    "grass": ("skimage", "grass.png", "CC0 (linolafett)", "Grass."),
    "gravel": ("skimage", "gravel.png", "CC0 (CC0Textures)", "Gravel."),
    "microaneurysms": ("skimage", "microaneurysms.png", "CC0 (Andreas Maier)",
                       "Retina with microaneurysms."),
    "grace_hopper": ("matplotlib", "grace_hopper.jpg", "public domain (U.S. Navy)",
                     "Commodore Grace M. Hopper, USN."),
}

# Keyframe crops, as a lecture video zooms in on part of a photograph: (source, box l,t,r,b).
# They also widen the range of aspect ratios (a 1:3 tall strip, a 3.4:1 wide strip).
CROPS = {
    "hubble_deep_field_zoom": ("hubble_deep_field", (300, 236, 700, 636)),
    "retina_optic_disc": ("retina", (55, 471, 415, 831)),
    "rocket_tall": ("rocket", (250, 0, 390, 427)),
    "astronaut_face": ("astronaut", (140, 0, 320, 200)),
    "coffee_cup": ("coffee", (150, 0, 450, 330)),
    "motorcycle_strip": ("motorcycle_left", (0, 200, 741, 420)),
}


def _package_file(package: str, name: str) -> Path:
    if package == "skimage":
        import skimage.data

        return Path(skimage.data.__file__).parent / name
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data(name, asfileobj=False))


def _encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Grayscale photographs stay single-channel JPEGs: the preprocessor must convert them.
    img.convert("L" if img.mode == "L" else "RGB").save(
        buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def image_path(name: str) -> str:
    """Path of an image relative to images/ (the corpus's image root)."""
    if name in PHOTOS:
        return f"{PHOTOS[name][0]}/{name}.jpg"
    return f"keyframes/{name}.jpg"


def write_images() -> dict[str, tuple[int, int]]:
    sizes = {}
    for name, (package, filename, _, _) in PHOTOS.items():
        src = _package_file(package, filename)
        dst = IMAGES / image_path(name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".jpg":
            dst.write_bytes(src.read_bytes())  # already JPEG: keep the original bytes
        else:
            dst.write_bytes(_encode_jpeg(Image.open(src)))
        sizes[name] = Image.open(dst).size
    for name, (source, box) in CROPS.items():
        dst = IMAGES / image_path(name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(_package_file(*PHOTOS[source][:2])) as img:
            dst.write_bytes(_encode_jpeg(img.crop(box)))
        sizes[name] = Image.open(dst).size
    return sizes


def caption(name: str) -> str:
    return PHOTOS[CROPS[name][0] if name in CROPS else name][3]


def license_of(name: str) -> str:
    return PHOTOS[CROPS[name][0] if name in CROPS else name][2]


# ----------------------------------------------------------------------------------------------
# Lectures. A script is a list of positions: "@name" is a keyframe, any other string is a
# transcript segment made of dictionary senses "word|needle; word|needle" (each the first
# 1913 Webster sense of `word` containing `needle`). Layout features the pipeline must handle:
# text before the first image (no loss there), runs of consecutive images, documents ending on
# an image, documents with more than 12 images (--max-num-images), and `text_ocr_list`.
# ----------------------------------------------------------------------------------------------

LECTURES = [
    ("lec01-cat", "The domestic cat", True, [
        "@chelsea", "cat|domestic cat includes; feline|Catlike",
        "whisker|long, projecting hairs; purr|express contentment",
        "@chelsea", "fur|short, fine, soft hair; tabby|brindled cat"]),
    ("lec02-coffee", "Coffee", False, [
        "beverage|Liquid for drinking", "@coffee", "coffee|beverage made by decoction",
        "@coffee_cup", "cup|used commonly to drink from; saucer|in which a cup is set",
        "coffee|introduced into England; porcelain|fine translucent"]),
    ("lec03-aeronauts", "Aerial navigators", False, [
        "@astronaut", "aeronaut|navigator; balloon|bag made of silk",
        "@astronaut_face", "helmet|helmet-shaped hat; uniform|dress of a particular style",
        "flight|act of flying; space|Extension, considered independently"]),
    ("lec04-rockets", "Rockets", True, [
        "@rocket", "rocket|artificial firework", "@rocket_tall",
        "smoke|visible exhalation; flame|stream of burning vapor",
        "projectile|body projected; gunpowder|black, granular, explosive", "@rocket"]),
    ("lec05-moon", "The moon", False, [
        "moon|celestial orb", "@moon", "crescent|increasing moon; lunar|Of or pertaining to the moon",
        "eclipse|interception or obscuration", "@moon", "tide|alternate rising and falling"]),
    ("lec06-deep-field", "The deep field", False, [
        "@hubble_deep_field", "@hubble_deep_field_zoom", "galaxy|Milky Way",
        "star|innumerable luminous bodies; telescope|viewing distant objects",
        "astronomy|science which treats of the celestial", "@hubble_deep_field_zoom",
        "light|That agent, force, or action"]),
    ("lec07-retina", "The retina", True, [
        "@retina", "retina|delicate membrane", "@retina_optic_disc",
        "optic|Of or pertaining to the eye; nerve|whitish and elastic bundles",
        "@microaneurysms", "vessel|tube or canal in which the blood; artery|carry either venous"]),
    ("lec08-the-eye", "The eye", False, [
        "eye|faculty of seeing", "pupil|aperture in the iris; iris|contractile membrane",
        "@retina", "lens|piece of glass", "@camera", "image|figure or picture of any object"]),
    ("lec09-coins", "Ancient coins", True, [
        "@coins", "coin|piece of metal on which certain characters",
        "money|piece of metal, as gold", "@coins",
        "drachma|silver coin among the ancient Greeks; obverse|face of a coin",
        "mint|place where money is coined"]),
    ("lec10-stereo", "Two eyes, two pictures", False, [
        "@motorcycle_left", "@motorcycle_right",
        "stereoscope|appearance of solid forms; binocular|employing both eyes",
        "bicycle|two wheels one behind the other; velocipede|propelled by the feet",
        "@motorcycle_strip", "wheel|circular frame turning; motor|prime mover"]),
    ("lec11-photography", "Photography", False, [
        "@camera", "camera|camera obscura when used in photography",
        "photograph|picture or likeness obtained", "tripod|three-legged frame",
        "@camera", "daguerreotype|early variety of photograph"]),
    ("lec12-page", "Printed and written pages", True, [
        "@page", "page|One side of a leaf; print|strike off an impression",
        "@text", "handwriting|cast or form of writing",
        "algebra|relations and properties of quantity; equation|condition of equality"]),
    ("lec13-histology", "Tissues and cells", False, [
        "@immunohistochemistry", "histology|minute (microscopic) structure; tissue|elementary materials",
        "gland|organ for secreting", "@cell", "cell|minute elementary structures",
        "protoplasm|viscid and more or less granular; microscope|enlarged image"]),
    ("lec14-brick", "Brick", False, [
        "@brick", "brick|block or clay tempered; brick|Bricks, collectively",
        "mortar|building material made by mixing lime; kiln|furnace for burning bricks",
        "@brick", "masonry|built by a mason; mason|build with stone or brick"]),
    ("lec15-grass", "Grass", False, [
        "grass|Popularly: Herbage", "@grass", "blade|leaf, or flat part; lawn|closely mown",
        "meadow|mown for hay; pasture|Grass land for cattle", "@grass"]),
    ("lec16-gravel", "Gravel and sand", True, [
        "@gravel", "gravel|Small stones, or fragments; pebble|small roundish piece",
        "sand|Fine particles of stone", "@gravel", "stone|In popular language"]),
    ("lec17-clock", "Clocks", False, [
        "@clock", "clock|watch, esp. one that strikes; dial|graduated face of a timepiece",
        "pendulum|body so suspended", "@clock", "blur|dim, confused appearance; motion|act, process"]),
    ("lec18-commodore", "A naval officer", True, [
        "@grace_hopper", "commodore|ranks next above a captain; admiral|naval officer of the highest",
        "navy|whole of the war vessels", "@grace_hopper",
        "compiler|One who compiles; uniform|dress of a particular style"]),
    ("lec19-textures", "Textures", False, [
        "@brick", "@grass", "@gravel", "texture|disposition of the several parts",
        "gray|any color of neutral hue; shadow|mark with gradations"]),
    ("lec20-space", "Above the sky", False, [
        "astronomy|science which treats of the celestial", "@rocket", "launch|send out",
        "@astronaut", "aeronaut|navigator", "@moon", "satellite|secondary planet which revolves",
        "@hubble_deep_field", "galaxy|Milky Way; sky|apparent arch"]),
    ("lec21-metals", "Silver and bronze", False, [
        "@coins", "silver|soft white metallic; bronze|alloy of copper and tin",
        "medal|piece of metal in the form of a coin", "@coins",
        "treasure|Wealth accumulated; currency|in circulation"]),
    ("lec22-household", "Household things", False, [
        "@coffee", "domestic|household or family", "spoon|small bowl", "@chelsea",
        "purr|express contentment", "@coffee_cup"]),
    ("lec23-microscopy", "Under the microscope", True, [
        "@cell", "membrane|thin layer or fold of tissue", "@immunohistochemistry",
        "stain|by processes affecting; dye|Material used for dyeing", "@microaneurysms",
        "histology|minute (microscopic) structure"]),
    ("lec24-colour", "Light and colour", False, [
        "@hubble_deep_field", "@retina", "color|relations of light to the eye",
        "color|sensation of color depends", "@immunohistochemistry", "light|source of, light"]),
    ("lec25-writing", "Writing", False, [
        "writing|act or art of forming letters", "letter|mark or character",
        "@text", "ink|used in writing or printing; manuscript|Written with or by the hand",
        "@page", "printing|act, art, or practice of impressing", "type|raised letter"]),
    ("lec26-time", "Measuring time", True, [
        "@moon", "hour|twenty-fourth part of a day; lunar|revolutions of the moon",
        "@clock", "dial|showing the time of day", "pendulum|regulate the movements"]),
    ("lec27-two-views", "Seeing with two eyes", False, [
        "@motorcycle_left", "eye|essential parts of the eye", "@motorcycle_right",
        "binocular|binocular glass; stereoscope|appearance of solid forms", "@motorcycle_strip"]),
    ("lec28-pilots", "Pilots and officers", False, [
        "@grace_hopper", "officer|holds an office; sailor|navigating ships",
        "@astronaut", "pilot|employed to steer; pilot|fly, or act as pilot"]),
    # Longer than the seed's 12-image limit: --max-num-images drops the tail.
    ("lec29-review", "Review of the photographs", True, [
        "@chelsea", "cat|domestic cat includes", "@coffee", "coffee|beverage made by decoction",
        "@astronaut", "aeronaut|navigator", "@rocket", "rocket|artificial firework",
        "@moon", "moon|celestial orb", "@hubble_deep_field", "galaxy|Milky Way",
        "@retina", "retina|delicate membrane", "@coins", "coin|piece of metal on which",
        "@motorcycle_left", "bicycle|two wheels", "@camera", "photograph|picture or likeness",
        "@page", "page|One side of a leaf", "@immunohistochemistry", "tissue|elementary materials",
        "@brick", "brick|block or clay tempered", "@grace_hopper", "commodore|ranks next above",
        "@clock", "clock|watch, esp. one that strikes"]),
    ("lec30-keyframes", "A run of keyframes", False, [
        "picture|representation of anything (as a person", "image|imitation, representation",
        "@hubble_deep_field", "@hubble_deep_field_zoom", "@retina", "@retina_optic_disc",
        "texture|disposition or connection of threads",
        "@coffee", "@coffee_cup", "@rocket", "@rocket_tall", "@astronaut", "@astronaut_face",
        "focus|central point", "@motorcycle_left", "@motorcycle_right", "@motorcycle_strip",
        "@brick", "@grass", "@gravel", "@text", "@page", "stone|In popular language"]),
]


def render_segment(spec: str, gcide: Gcide) -> tuple[str, list[str]]:
    pieces, words = [], []
    for item in spec.split("; "):
        word, needle = item.split("|")
        pieces.append(f"{word.capitalize()}: {gcide.sense(word, needle)}")
        words.append(word)
    return " ".join(pieces), words


def build_lecture(doc_id, title, with_ocr, script, gcide, sizes, sp) -> dict:
    images, texts, ocr, metadata = [], [], [], []
    last_image = None
    for pos in script:
        if pos.startswith("@"):
            name = pos[1:]
            images.append(image_path(name))
            texts.append(None)
            ocr.append(None)
            w, h = sizes[name]
            metadata.append({"name": name, "width": w, "height": h, "license": license_of(name)})
            last_image = name
        else:
            text, words = render_segment(pos, gcide)
            images.append(None)
            texts.append(text)
            # OCR = asr + the words shown on the current keyframe, as in the seed's corpus
            ocr.append(text if last_image is None else f"{text} {caption(last_image)}")
            metadata.append({"headwords": words, "source": "GCIDE (1913 Webster)"})
    image_num = sum(i is not None for i in images)
    text_num = len(sp.encode(" ".join(t for t in texts if t is not None)))
    doc = {"images": images, "texts": texts}
    if with_ocr:
        doc["text_ocr_list"] = ocr
    doc.update({
        "metadata": metadata,
        "general_metadata": {"id": doc_id, "title": title},
        "image_num": image_num,
        "text_num": text_num,
        "token_num": text_num + TOKENS_PER_IMAGE * image_num,
    })
    return doc


# ----------------------------------------------------------------------------------------------
# MMC4 layout: sentences in `text_list`, images in `image_info`, and an images x sentences
# `similarity_matrix`. Real MMC4 scores come from CLIP; these are hand-set so that the matching
# is meaningful: in "mmc4-space" the rocket and the moon both score highest on the satellite
# sentence, so the per-image argmax (`matched_text_index`) collides; the maximum-weight matching
# gives astronaut -> 0, rocket -> 1, moon -> 2. "mmc4-textures" has more images than sentences,
# so the matching keeps only two of its three images.
# ----------------------------------------------------------------------------------------------

GRACE_HOPPER_URL = ("https://raw.githubusercontent.com/matplotlib/matplotlib/v{version}/lib/"
                    "matplotlib/mpl-data/sample_data/grace_hopper.jpg")

MMC4_DOCS = [
    ("mmc4-coins", ["coin|piece of metal on which certain characters", "money|piece of metal, as gold",
                    "drachma|silver coin among the ancient Greeks", "mint|place where money is coined"],
     ["coins"], [[0.331, 0.287, 0.262, 0.214]]),
    ("mmc4-space", ["aeronaut|navigator", "rocket|artificial firework",
                    "satellite|secondary planet which revolves", "moon|celestial orb",
                    "telescope|viewing distant objects"],
     ["astronaut", "rocket", "moon"],
     [[0.302, 0.241, 0.198, 0.176, 0.203],
      [0.221, 0.296, 0.309, 0.195, 0.188],
      [0.167, 0.204, 0.318, 0.297, 0.242]]),
    ("mmc4-vision", ["eye|organ of sight or vision", "retina|delicate membrane",
                     "camera|camera obscura when used in photography",
                     "commodore|ranks next above a captain", "compiler|One who compiles"],
     ["retina", "camera", "url:grace_hopper"],
     [[0.274, 0.336, 0.191, 0.142, 0.133],
      [0.223, 0.181, 0.305, 0.156, 0.149],
      [0.168, 0.139, 0.187, 0.311, 0.262]]),
    ("mmc4-textures", ["brick|block or clay tempered", "gravel|Small stones, or fragments"],
     ["brick", "grass", "gravel"],
     [[0.327, 0.214], [0.231, 0.226], [0.219, 0.318]]),
]


def build_mmc4(gcide: Gcide) -> list[dict]:
    import matplotlib

    docs = []
    for doc_id, sentences, image_names, sim in MMC4_DOCS:
        text_list = [render_segment(s, gcide)[0] for s in sentences]
        image_info = []
        for row, name in zip(sim, image_names):
            best = int(np.argmax(row))
            if name.startswith("url:"):
                # No image_name: the loader hashes the URL with sha256 to find the file.
                url = GRACE_HOPPER_URL.format(version=matplotlib.__version__)
                hashed = hashlib.sha256(url.encode()).hexdigest()
                shutil.copyfile(IMAGES / image_path(name[4:]), IMAGES / hashed)
                info = {"image_url": url}
            else:
                info = {"image_name": image_path(name)}
            info.update({"matched_text_index": best, "matched_sim": row[best]})
            image_info.append(info)
        docs.append({"url": f"sample://{doc_id}", "text_list": text_list,
                     "image_info": image_info, "similarity_matrix": sim})
    return docs


# ----------------------------------------------------------------------------------------------
# Deliberately broken input, one problem per line, for the error report of the preprocessor.
# Its image root is bad/images/, which holds one good photograph and two broken files.
# ----------------------------------------------------------------------------------------------

def write_bad(gcide: Gcide) -> None:
    bad = HERE / "bad"
    (bad / "images").mkdir(parents=True, exist_ok=True)
    good = (IMAGES / image_path("coins")).read_bytes()
    (bad / "images" / "coins.jpg").write_bytes(good)
    (bad / "images" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "images" / "not_a_jpeg.jpg").write_bytes(b"This file is text, not a picture.\n")
    coin = render_segment("coin|piece of metal on which certain characters", gcide)[0]
    mint = render_segment("mint|place where money is coined", gcide)[0]

    def line(images, texts):
        return json.dumps({"images": images, "texts": texts}, ensure_ascii=False)

    lines = [
        line(["coins.jpg", None], [None, coin]),                      # 1 good
        line(["coins.jpg", None], [None, coin])[:40],                 # 2 malformed JSON
        line(["coins.jpg", None, None], [None, coin]),                # 3 lists of unequal length
        line(["coins.jpg", None], [coin, mint]),                      # 4 image and text at position 0
        line([None, "coins.jpg"], [None, None]),                      # 5 neither at position 0
        line(["missing.jpg", None], [None, coin]),                    # 6 image file does not exist
        line(["truncated.jpg", None], [None, coin]),                  # 7 truncated JPEG
        line(["not_a_jpeg.jpg", None], [None, coin]),                 # 8 not an image at all
        line([None, None], [coin, mint]),                             # 9 no image
        line([], []),                                                 # 10 empty document
        line([None, "coins.jpg", None], [mint, None, coin]),          # 11 good
    ]
    (bad / "bad.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def text_only_documents(lectures: list[dict], count: int = 12) -> list[dict]:
    """The transcripts of the first `count` lectures without their keyframes: a text-only corpus
    in the OBELICS layout (every ``images`` entry null), as blended in to keep language skills."""
    out = []
    for doc in lectures[:count]:
        texts = [t for t in doc["texts"] if t is not None]
        meta = doc["general_metadata"]
        out.append({"images": [None] * len(texts), "texts": texts,
                    "general_metadata": {"id": meta["id"] + "-text", "title": meta["title"]}})
    return out


def write_text_only(lectures: list[dict]) -> None:
    with open(HERE / "text_sample.jsonl", "w", encoding="utf-8") as f:
        for doc in text_only_documents(lectures):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")


def main() -> None:
    import mistral_common
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(
        model_file=str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"))
    gcide = Gcide()
    shutil.rmtree(IMAGES, ignore_errors=True)
    shutil.rmtree(HERE / "bad", ignore_errors=True)
    sizes = write_images()

    docs = [build_lecture(*lecture, gcide, sizes, sp) for lecture in LECTURES]
    with open(HERE / "textbook_sample.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    write_text_only(docs)
    mmc4 = build_mmc4(gcide)
    # a JSON list (not JSONL) so that both input layouts are exercised; one document per line
    (HERE / "mmc4_sample.json").write_text(
        "[\n" + ",\n".join(json.dumps(d, ensure_ascii=False) for d in mmc4) + "\n]\n",
        encoding="utf-8")
    write_bad(gcide)

    occurrences = sum(d["image_num"] for d in docs)
    used = {p for d in docs for p in d["images"] if p}
    size = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"textbook: {len(docs)} documents, {occurrences} image occurrences, "
          f"{len(used)} distinct images, up to {max(d['image_num'] for d in docs)} per document")
    print(f"mmc4: {len(mmc4)} documents, {sum(len(d['image_info']) for d in mmc4)} images")
    files = [p for p in IMAGES.rglob("*") if p.is_file()]
    print(f"images/: {len(files)} files; examples/data total {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
