"""Wafer maps: die-state grids from .npy/.npz, SEMI G85 XML and KLARF 1.2 files, and how they become model input.

A wafer map is not a photograph: each cell is one die in one of three states, ``0`` no die (outside the
wafer or not probed), ``1`` pass, ``2`` fail (WM-811K's convention). The model sees the grid rendered as
intensities 0/128/255 and resized with nearest-neighbour (see :func:`defectscope.data.images.load_gray`),
so no blur mixes neighbouring dies and the three states stay distinct at any size.

Only numpy and the standard library (plus ``defusedxml`` when installed) are imported here, never torch or
pandas: the deployed predictor decodes wafer maps through this module. The WM-811K pickle reader, which
needs pandas, is :mod:`defectscope.data.wm811k`.

SEMI G85 is read from the standard (``<Map>``/``<Device>`` with ``BinType`` or ``BinCodeType``, ``NullBin``,
``<Bin BinCode= BinQuality=>``, ``<Data><Row>``); the PyPI package ``g85`` is GPLv3, which an Apache-2.0
project cannot take. Bin codes become die states: the NullBin code -> 0, bins whose ``BinQuality`` is
``Pass`` -> 1, every other bin (``Fail``, anything else, or a code no ``<Bin>`` declares) -> 2. ``NULL`` quality
-> 0. KLARF (an inspection tool's defect list) becomes a map of which tested dies carry a defect.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from defectscope.errors import DefectscopeError

__all__ = [
    "FAIL",
    "NO_DIE",
    "PASS",
    "STATE_INTENSITY",
    "WAFER_EXTENSIONS",
    "G85Map",
    "WaferMapError",
    "die_states",
    "is_wafer_file",
    "parse_g85",
    "parse_klarf",
    "read_die_grid",
    "render_die_states",
]

NO_DIE, PASS, FAIL = 0, 1, 2
# Evenly spaced so each state survives any later 8-bit handling; index = die state.
STATE_INTENSITY = np.array([0, 128, 255], dtype=np.uint8)
KLARF_EXTENSIONS: frozenset[str] = frozenset({".klarf", ".klf", ".kla"})
WAFER_EXTENSIONS: frozenset[str] = frozenset({".npy", ".npz", ".xml"}) | KLARF_EXTENSIONS
NPZ_KEY = "die_states"  # the array name written by `defectscope wafer convert` and the generator
MAX_XML_BYTES = 64 * 1024 * 1024  # a G85 map of 1000 x 1000 dies is a few MB


class WaferMapError(DefectscopeError, ValueError):
    """A wafer-map file or array that cannot be used; the message says why (callers add the file name)."""


@dataclass
class G85Map:
    """One G85 map: ``states`` (uint8 die states), the raw ``codes`` grid and the header attributes."""

    states: np.ndarray
    codes: list[list[str]]
    attributes: dict[str, str] = field(default_factory=dict)
    bins: dict[str, str] = field(default_factory=dict)  # bin code -> BinQuality


def is_wafer_file(path: str | os.PathLike) -> bool:
    return os.path.splitext(os.fsdecode(path))[1].lower() in WAFER_EXTENSIONS


def die_states(array: Any, *, max_pixels: int | None = None) -> np.ndarray:
    """Check an array is a 2-D grid of die states 0/1/2 and return it as a new uint8 array."""
    arr = np.asarray(array)
    if arr.dtype == object:
        raise WaferMapError("object array; a die grid holds integers 0 (no die), 1 (pass), 2 (fail)")
    if arr.ndim != 2:
        raise WaferMapError(f"a die grid must be 2-D, got shape {arr.shape}")
    if arr.size == 0:
        raise WaferMapError(f"empty die grid (shape {arr.shape})")
    if max_pixels is not None and arr.size > max_pixels:
        raise WaferMapError(f"too large: {arr.shape[0]}x{arr.shape[1]} dies > max_pixels={max_pixels}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise WaferMapError("die states must be whole numbers 0, 1, 2")
    elif arr.dtype.kind not in "biu":
        raise WaferMapError(f"unsupported dtype {arr.dtype} for a die grid")
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 2:
        raise WaferMapError(f"die states must be 0 (no die), 1 (pass) or 2 (fail); found values {lo}..{hi}")
    return arr.astype(np.uint8)


def render_die_states(states: np.ndarray) -> np.ndarray:
    """Die states -> uint8 intensities 0 / 128 / 255 at the grid's own resolution (one pixel per die)."""
    return STATE_INTENSITY[die_states(states)]


def read_die_grid(path: str | os.PathLike, *, max_pixels: int | None = None) -> np.ndarray:
    """Die states (uint8, 0/1/2) from a .npy, .npz (array ``die_states`` or a single array), G85 .xml or
    KLARF 1.2 (.klarf/.klf/.kla) file.

    Never unpickles: ``.npy``/``.npz`` are opened with ``allow_pickle=False``.
    """
    ext = os.path.splitext(os.fsdecode(path))[1].lower()
    if ext in KLARF_EXTENSIONS:
        with open(path, "rb") as fh:
            data = fh.read(MAX_XML_BYTES + 1)
        if len(data) > MAX_XML_BYTES:
            raise WaferMapError(f"KLARF file larger than {MAX_XML_BYTES // 2**20} MB")
        return die_states(parse_klarf(data), max_pixels=max_pixels)
    if ext == ".xml":
        with open(path, "rb") as fh:
            data = fh.read(MAX_XML_BYTES + 1)
        return die_states(parse_g85(data).states, max_pixels=max_pixels)
    if ext == ".npy":
        try:
            # mmap reads the header only, so an oversized grid is refused before its data is read.
            arr = np.load(path, allow_pickle=False, mmap_mode="r")
        except ValueError as exc:
            raise WaferMapError(f"not a plain numpy array file ({exc})") from None
        if max_pixels is not None and arr.size > max_pixels:
            raise WaferMapError(f"too large: shape {arr.shape} > max_pixels={max_pixels}")
        return die_states(np.array(arr), max_pixels=max_pixels)
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if NPZ_KEY in names:
                    name = NPZ_KEY
                elif len(names) == 1:
                    name = names[0]
                else:
                    raise WaferMapError(f"holds arrays {names}; expected one named {NPZ_KEY!r} or a single array")
                # A compressed member can inflate enormously; its declared size is checked before it is read
                # (zipfile stops at the declared size, so the check cannot be lied past).
                member = archive.zip.getinfo(name + ".npy")
                if max_pixels is not None and member.file_size > 8 * max_pixels + 4096:
                    raise WaferMapError(f"array {name!r} unpacks to {member.file_size} bytes; too large "
                                        f"for max_pixels={max_pixels} (possible zip bomb)")
                return die_states(archive[name], max_pixels=max_pixels)
        except (WaferMapError, MemoryError):
            raise
        except Exception as exc:  # BadZipFile, ValueError (object arrays), OSError, EOFError from a damaged file
            raise WaferMapError(f"not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    raise WaferMapError(f"not a wafer-map file (expected {', '.join(sorted(WAFER_EXTENSIONS))})")


# ---------------------------------------------------------------------------------------------------- G85

_DOCTYPE = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def _parse_xml(data: bytes):
    """Parse untrusted XML: no DTD, no entities (billion laughs, external entities are refused)."""
    if len(data) > MAX_XML_BYTES:
        raise WaferMapError(f"XML larger than {MAX_XML_BYTES // 2**20} MB; not a plausible G85 map")
    # G85 needs no DTD; refusing one outright stops entity expansion even without defusedxml.
    if _DOCTYPE.search(data):
        raise WaferMapError("XML with a DOCTYPE or ENTITY declaration refused (possible entity bomb); "
                            "G85 maps need neither")
    try:
        from defusedxml import DefusedXmlException
        from defusedxml.ElementTree import fromstring
    except ImportError:  # defusedxml is a declared dependency; the DOCTYPE check above still protects
        from xml.etree.ElementTree import fromstring

        DefusedXmlException = ()  # noqa: N806
    from xml.etree.ElementTree import ParseError

    try:
        if DefusedXmlException:
            return fromstring(data, forbid_dtd=True)
        return fromstring(data)
    except ParseError as exc:
        raise WaferMapError(f"not well-formed XML ({exc})") from None
    except DefusedXmlException as exc:  # type: ignore[misc]
        raise WaferMapError(f"unsafe XML refused ({type(exc).__name__})") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _find(elem, name: str):
    for child in elem.iter():
        if _local(child.tag) == name:
            return child
    return None


def _attr(elem, *names: str, default: str | None = None) -> str | None:
    lower = {_local(k).lower(): v for k, v in elem.attrib.items()}
    for name in names:
        if name.lower() in lower:
            return lower[name.lower()].strip()
    return default


def parse_g85(data: bytes | str) -> G85Map:
    """Parse one SEMI G85 map (XML text) into die states; raises :class:`WaferMapError` with the reason."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    root = _parse_xml(data)
    maps = [e for e in root.iter() if _local(e.tag) == "Map"]
    if not maps:
        raise WaferMapError("no <Map> element; not a SEMI G85 map")
    if len(maps) > 1:
        raise WaferMapError(f"holds {len(maps)} <Map> elements; one map per file is expected")
    device = _find(maps[0], "Device")
    if device is None:
        raise WaferMapError("<Map> has no <Device> element")
    bin_type = (_attr(device, "BinType", "BinCodeType", default="ASCII") or "ASCII").lower()
    if bin_type not in {"ascii", "decimal", "hexadecimal", "integer2"}:
        raise WaferMapError(f"unknown BinType {bin_type!r} (ASCII, Decimal, HexaDecimal or Integer2)")
    null_bin = _attr(device, "NullBin")

    def norm(code: str) -> str:
        # Numeric bin types compare by value: BinCode="01" and a row's "1" are the same bin.
        code = code.strip()
        if bin_type == "decimal":
            return str(int(code)) if code.lstrip("-").isdigit() else code
        if bin_type in {"hexadecimal", "integer2"}:
            try:
                return str(int(code, 16))
            except ValueError:
                return code
        return code

    bins: dict[str, str] = {}
    for b in device.iter():
        if _local(b.tag) == "Bin":
            code = _attr(b, "BinCode")
            if code is None:
                raise WaferMapError("a <Bin> element has no BinCode attribute")
            bins[norm(code)] = (_attr(b, "BinQuality", default="") or "").lower()
    data_elem = _find(device, "Data")
    if data_elem is None:
        raise WaferMapError("<Device> has no <Data> element")
    rows = [r for r in data_elem if _local(r.tag) == "Row"]
    if not rows:
        raise WaferMapError("<Data> has no <Row> elements")
    width = {"ascii": 1, "hexadecimal": 2, "integer2": 4}.get(bin_type)
    codes: list[list[str]] = []
    for i, row in enumerate(rows, start=1):
        text = (row.text or "").strip()
        if any(c.isspace() for c in text) or width is None:
            cells = text.split()
        else:
            if len(text) % width:
                raise WaferMapError(f"<Row> {i}: {len(text)} characters is not a whole number of "
                                    f"{width}-character {bin_type} bin codes")
            cells = [text[j:j + width] for j in range(0, len(text), width)]
        codes.append(cells)
    n_cols = len(codes[0])
    for i, cells in enumerate(codes, start=1):
        if len(cells) != n_cols:
            raise WaferMapError(f"<Row> {i} has {len(cells)} dies, row 1 has {n_cols}; rows must be equal")
    if n_cols == 0:
        raise WaferMapError("empty rows: no dies")
    for name, actual in (("Rows", len(codes)), ("Columns", n_cols)):
        declared = _attr(device, name)
        if declared and declared.isdigit() and int(declared) != actual:
            raise WaferMapError(f"<Device {name}=\"{declared}\"> but the data has {actual}")
    null = norm(null_bin) if null_bin is not None else None
    states = np.full((len(codes), n_cols), FAIL, dtype=np.uint8)
    for r, cells in enumerate(codes):
        for c, cell in enumerate(cells):
            code = norm(cell)
            if code == null:
                states[r, c] = NO_DIE
            elif bins.get(code) == "pass":
                states[r, c] = PASS
            elif bins.get(code) == "null":
                states[r, c] = NO_DIE
    attributes = {**{_local(k): v for k, v in maps[0].attrib.items()},
                  **{_local(k): v for k, v in device.attrib.items()}}
    return G85Map(states=states, codes=codes, attributes=attributes, bins=bins)


def write_g85(states: np.ndarray, *, substrate_id: str = "W01", lot_id: str = "LOT1") -> str:
    """A G85 XML map (ASCII bins: ``.`` no die, ``1`` pass, ``X`` fail) for a die grid; for tests and tools."""
    states = die_states(states)
    symbol = {NO_DIE: ".", PASS: "1", FAIL: "X"}
    rows = "\n".join(f"        <Row><![CDATA[{''.join(symbol[int(v)] for v in row)}]]></Row>" for row in states)
    n_pass, n_fail = int((states == PASS).sum()), int((states == FAIL).sum())
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<Maps xmlns:semi="http://www.semi.org">\n'
        f'  <Map SubstrateType="Wafer" SubstrateId="{substrate_id}" FormatRevision="SEMI G85-0703">\n'
        f'    <Device LotId="{lot_id}" Orientation="0" Rows="{states.shape[0]}" Columns="{states.shape[1]}" '
        'BinType="ASCII" NullBin=".">\n'
        f'      <Bin BinCode="1" BinCount="{n_pass}" BinQuality="Pass" BinDescription="good die"/>\n'
        f'      <Bin BinCode="X" BinCount="{n_fail}" BinQuality="Fail" BinDescription="failed die"/>\n'
        '      <Data MapName="Map" MapVersion="1">\n'
        f"{rows}\n"
        "      </Data>\n"
        "    </Device>\n"
        "  </Map>\n"
        "</Maps>\n"
    )


def wafer_features(states: np.ndarray) -> np.ndarray:
    """A rotation-invariant description of where a map's fails are (27 numbers), for nearest-neighbour checks.

    Radial fail density in 8 rings; fail density in 12 sectors of the inner and outer wafer, described by
    the magnitudes of their Fourier coefficients 0-3 (a rotation only shifts the phases); the overall fail
    share; and how line-like the fails are (share of variance on their main axis, spread). Pixels cannot
    match an Edge-Loc at 3 o'clock with one at 9 o'clock; these features do.
    """
    states = die_states(states)
    h, w = states.shape
    y, x = np.mgrid[0:h, 0:w].astype(float)
    dy, dx = (y - (h - 1) / 2) / (h / 2), (x - (w - 1) / 2) / (w / 2)
    r, theta = np.clip(np.hypot(dx, dy), 0, 0.999), np.arctan2(dy, dx)
    inside, fail = states > 0, states == FAIL

    def density(mask: np.ndarray) -> float:
        n = (inside & mask).sum()
        return float((fail & mask).sum() / n) if n else 0.0

    radial = [density((r >= a) & (r < a + 0.125)) for a in np.arange(0, 1, 0.125)]
    sector = ((theta + np.pi) / (2 * np.pi) * 12).astype(int) % 12
    angular = []
    for zone in (r < 0.6, r >= 0.6):
        dens = np.array([density(zone & (sector == k)) for k in range(12)])
        angular += list(np.abs(np.fft.rfft(dens))[:4] / 12)
    share = float(fail.sum() / max(inside.sum(), 1))
    line, spread = 0.0, 0.0
    if fail.sum() >= 3:
        pts = np.c_[dx[fail], dy[fail]]
        eig = np.linalg.eigvalsh(np.cov(pts.T))
        line = float(eig[1] / max(eig.sum(), 1e-9))
        spread = float(np.sqrt(max(eig.sum(), 0.0)))
    return np.array([*radial, *angular, share, line, spread, density(r < 0.3), density(r >= 0.85),
                     float(np.std(radial)), float(np.mean(radial))], dtype=np.float32)


# -------------------------------------------------------------------------------------------------- KLARF

_KLARF_TOKEN = re.compile(r'"[^"]*"|;|[^\s;"]+')


def parse_klarf(data: bytes | str) -> np.ndarray:
    """Die states of one wafer in a KLARF 1.2 defect file (the flat ``Keyword values;`` syntax).

    The dies of ``SampleTestPlan`` exist (1, pass) unless a ``DefectList`` row names them by ``XINDEX YINDEX``
    (2, fail); grid positions no test plan entry names are 0. Rows run from the highest ``YINDEX`` down, so
    +Y points up as on the wafer. KLARF 1.8 (``Record``/``Field`` syntax) and files with several wafers are
    refused with the reason.
    """
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    tokens = _KLARF_TOKEN.findall(text)
    statements: list[list[str]] = []
    current: list[str] = []
    for tok in tokens:
        if tok == ";":
            if current:
                statements.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        statements.append(current)
    if not statements:
        raise WaferMapError("empty KLARF file")
    if statements[0][0] == "Record" or (statements[0][0] == "FileVersion" and statements[0][1:2] == ["1"]
                                         and statements[0][2:3] == ["8"]):
        raise WaferMapError("KLARF 1.8 (Record/Field syntax) is not read; export KLARF 1.2 or G85")
    if statements[0][0] != "FileVersion":
        raise WaferMapError("not a KLARF file (it must start with FileVersion)")
    wafers = [st for st in statements if st[0] == "WaferID"]
    if len(wafers) > 1:
        raise WaferMapError(f"holds {len(wafers)} wafers (WaferID records); one wafer per file is expected")
    plan: list[tuple[int, int]] = []
    spec: list[str] = []
    defects: list[tuple[int, int]] = []
    for st in statements:
        key, values = st[0], st[1:]
        try:
            if key == "SampleTestPlan":
                n = int(values[0])
                coords = [int(v) for v in values[1:]]
                if len(coords) != 2 * n:
                    raise WaferMapError(f"SampleTestPlan declares {n} dies but lists {len(coords) // 2}")
                plan = list(zip(coords[0::2], coords[1::2], strict=True))
            elif key == "DefectRecordSpec":
                spec = [v.upper() for v in values[1:]]
                if len(spec) != int(values[0]):
                    raise WaferMapError(f"DefectRecordSpec declares {values[0]} fields but names {len(spec)}")
            elif key == "DefectList" and values:
                if not {"XINDEX", "YINDEX"} <= set(spec):
                    raise WaferMapError("DefectList before a DefectRecordSpec with XINDEX and YINDEX")
                width = len(spec)
                if len(values) % width:
                    raise WaferMapError(f"DefectList has {len(values)} values, not a multiple of {width} fields")
                xi, yi = spec.index("XINDEX"), spec.index("YINDEX")
                for r in range(0, len(values), width):
                    defects.append((int(float(values[r + xi])), int(float(values[r + yi]))))
        except WaferMapError:
            raise
        except (ValueError, IndexError) as exc:
            raise WaferMapError(f"malformed {key} record ({exc})") from None
    if not plan:
        raise WaferMapError("no SampleTestPlan: the wafer's die layout is unknown")
    xs = [x for x, _ in plan + defects]
    ys = [y for _, y in plan + defects]
    x0, y1 = min(xs), max(ys)
    states = np.zeros((y1 - min(ys) + 1, max(xs) - x0 + 1), dtype=np.uint8)
    for x, y in plan:
        states[y1 - y, x - x0] = PASS
    for x, y in defects:
        states[y1 - y, x - x0] = FAIL
    return states
