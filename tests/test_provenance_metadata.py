"""Metadata readers on real files written by Pillow: XMP/IPTC, EXIF, generator text chunks.

Also the hostile cases the issue lists: XMP with entity expansion or external entities,
oversized packets, thousands of text chunks, a zip bomb in a compressed chunk.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin
from provenance_assets import DST, photo, png_with_text, xmp_packet

from clipguard.provenance import exif, pngtext, xmp
from clipguard.provenance.containers import png_chunks

A1111 = (
    "a castle on a hill, golden hour\n"
    "Negative prompt: blurry\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: v1.9.4"
)
COMFY_PROMPT = {
    "4": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "flux1-dev-fp8.safetensors"},
    },
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "midjourney style cat", "clip": ["4", 1]},
    },
}
COMFY_WORKFLOW = {
    "nodes": [
        {"id": 4, "type": "CheckpointLoaderSimple", "widgets_values": ["flux1-dev-fp8.safetensors"]}
    ]
}


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _insert_chunks(png: bytes, chunks: bytes) -> bytes:
    """Raw chunks right after IHDR (Pillow would refuse to write some of them)."""
    ihdr_end = 8 + 8 + 13 + 4
    return png[:ihdr_end] + chunks + png[ihdr_end:]


# --- XMP / IPTC -------------------------------------------------------------------------


def _jpeg_xmp(body: str) -> bytes:
    return photo(fmt="JPEG", xmp=xmp_packet(body))


def test_iptc_generated_as_attribute_in_jpeg() -> None:
    data = _jpeg_xmp(
        f' Iptc4xmpExt:DigitalSourceType="{DST}trainedAlgorithmicMedia"'
        ' xmp:CreatorTool="Midjourney v6"/>'
    )
    [evidence] = xmp.read(data)
    assert (evidence.kind, evidence.claim, evidence.generator, evidence.trusted) == (
        "iptc",
        "ai_generated",
        "midjourney",
        False,
    )
    assert "trainedAlgorithmicMedia" in evidence.detail


def test_iptc_as_element_and_resource_in_png_and_webp() -> None:
    tag = "Iptc4xmpExt:DigitalSourceType"
    element = f"><{tag}>{DST}digitalCapture</{tag}></rdf:Description>"
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp_packet(element).decode(), zip=True)
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG", pnginfo=info)
    assert [(e.kind, e.claim) for e in xmp.read(out.getvalue())] == [("iptc", "real")]

    resource = (
        f'><Iptc4xmpExt:DigitalSourceType rdf:resource="{DST}compositeWithTrainedAlgorithmicMedia"'
        "/><Iptc4xmpExt:AISystemUsed>Adobe Firefly Image 3</Iptc4xmpExt:AISystemUsed>"
        "</rdf:Description>"
    )
    [evidence] = xmp.read(photo(fmt="WEBP", xmp=xmp_packet(resource)))
    assert (evidence.claim, evidence.generator) == ("ai_generated", "firefly")


def test_xmp_found_by_scan_in_tiff() -> None:
    packet = xmp_packet(f' Iptc4xmpExt:DigitalSourceType="{DST}trainedAlgorithmicMedia"/>')
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "TIFF", tiffinfo={700: packet})
    assert [e.claim for e in xmp.read(out.getvalue())] == ["ai_generated"]


def test_creator_tool_of_an_editor_is_not_evidence() -> None:
    assert xmp.read(_jpeg_xmp(' xmp:CreatorTool="Adobe Photoshop 25.0 (Windows)"/>')) == []
    [evidence] = xmp.read(_jpeg_xmp(' xmp:CreatorTool="ComfyUI"/>'))
    assert (evidence.kind, evidence.claim, evidence.generator) == (
        "generator_metadata",
        "ai_generated",
        "comfyui",
    )


LAUGHS = (
    '<!DOCTYPE x [<!ENTITY a "lol"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]>',
    "&d;",
)
EXTERNAL = ('<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>', "&e;")


@pytest.mark.parametrize("doctype,reference", [LAUGHS, EXTERNAL], ids=["billion-laughs", "xxe"])
def test_xmp_with_a_dtd_is_refused_not_expanded(doctype: str, reference: str) -> None:
    packet = xmp_packet(f' Iptc4xmpExt:DigitalSourceType="{reference}"/>').decode()
    body = packet.split("?>", 1)[1]  # drop the xpacket header: the DOCTYPE must come first
    [evidence] = xmp.read(photo(fmt="JPEG", xmp=(doctype + body).encode()))
    assert (evidence.kind, evidence.claim) == ("iptc", "unknown")
    assert "Forbidden" in evidence.detail  # defusedxml's DTDForbidden


def test_oversized_xmp_is_not_parsed() -> None:
    padding = "<!-- " + "x" * (300 * 1024) + " -->"
    packet = xmp_packet(f' Iptc4xmpExt:DigitalSourceType="{DST}trainedAlgorithmicMedia"/>{padding}')
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "TIFF", tiffinfo={700: packet})
    [evidence] = xmp.read(out.getvalue())
    assert evidence.claim == "unknown" and "cap" in evidence.detail


# --- EXIF -------------------------------------------------------------------------------


def _exif(**tags: object) -> Image.Exif:
    data = Image.Exif()
    names = {"software": 0x0131, "make": 0x010F, "model": 0x0110, "description": 0x010E}
    for name, value in tags.items():
        if name == "user_comment":
            data.get_ifd(0x8769)[0x9286] = value
        else:
            data[names[name]] = value
    return data


def test_exif_software_names_a_generator() -> None:
    [evidence] = exif.read(photo(fmt="JPEG", exif=_exif(software="NovelAI")))
    assert (evidence.kind, evidence.claim, evidence.generator) == (
        "exif",
        "ai_generated",
        "novelai",
    )


def test_exif_camera_and_editor() -> None:
    [camera] = exif.read(photo(fmt="JPEG", exif=_exif(make="Canon", model="EOS R5")))
    assert (camera.claim, camera.trusted) == ("real", False)
    assert "Canon" in camera.detail and "EOS R5" in camera.detail
    [edited] = exif.read(
        photo(fmt="WEBP", exif=_exif(make="Canon", software="Adobe Photoshop 25.0"))
    )
    assert edited.claim == "edited"


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_a1111_parameters_in_exif_user_comment(fmt: str) -> None:
    comment = b"UNICODE\x00" + A1111.encode("utf-16-be")
    evidence = exif.read(photo(fmt=fmt, exif=_exif(user_comment=comment)))
    assert [(e.kind, e.claim, e.generator) for e in evidence] == [
        ("generator_metadata", "ai_generated", "stable_diffusion")
    ]
    assert "sd_xl_base_1.0" in evidence[0].detail


def test_exif_in_png_and_broken_exif() -> None:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG", exif=_exif(software="Midjourney"))
    assert [e.generator for e in exif.read(out.getvalue())] == ["midjourney"]
    broken = photo(fmt="JPEG").replace(
        b"\xff\xdb", b"\xff\xe1\x00\x10Exif\x00\x00MM\x00*\xff\xff\xff\xff\xff\xdb", 1
    )
    assert all(e.claim == "unknown" for e in exif.read(broken))


# --- generator text chunks --------------------------------------------------------------


def test_a1111_parameters_chunk() -> None:
    [evidence] = pngtext.read(png_with_text([("tEXt", "parameters", A1111)]))
    assert (evidence.kind, evidence.claim, evidence.generator, evidence.trusted) == (
        "generator_metadata",
        "ai_generated",
        "stable_diffusion",
        False,
    )
    assert "AUTOMATIC1111" in evidence.detail and "v1.9.4" in evidence.detail


def test_comfyui_prompt_and_workflow_name_the_model() -> None:
    data = png_with_text(
        [
            ("tEXt", "prompt", json.dumps(COMFY_PROMPT)),
            ("tEXt", "workflow", json.dumps(COMFY_WORKFLOW)),
        ]
    )
    [evidence] = pngtext.read(data)
    assert evidence.generator == "flux"  # from the checkpoint name, not the prompt's "midjourney"
    assert "ComfyUI" in evidence.detail


def test_comfyui_without_a_known_model_names_the_front_end() -> None:
    prompt = {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}
    [evidence] = pngtext.read(png_with_text([("zTXt", "prompt", json.dumps(prompt))]))
    assert evidence.generator == "comfyui"


def test_novelai_invokeai_midjourney_and_plain_text() -> None:
    novelai = png_with_text(
        [
            ("tEXt", "Software", "NovelAI"),
            ("tEXt", "Source", "Stable Diffusion XL C1E1DE52"),
            ("tEXt", "Comment", json.dumps({"steps": 28, "sampler": "k_euler", "seed": 5})),
        ]
    )
    assert [e.generator for e in pngtext.read(novelai)] == ["novelai", "stable_diffusion"]
    invoke = png_with_text(
        [("iTXt", "invokeai_metadata", json.dumps({"model": {"name": "juggernautXL_v9"}}))]
    )
    assert [e.generator for e in pngtext.read(invoke)] == ["stable_diffusion"]
    mj = png_with_text(
        [("iTXt-z", "Description", "a fox --ar 3:2 Job ID: 0f7a9e2c-1d2b-4c3e-9f4a")]
    )
    assert [e.generator for e in pngtext.read(mj)] == ["midjourney"]
    plain = png_with_text([("tEXt", "Title", "Holiday"), ("tEXt", "parameters", "just words")])
    assert pngtext.read(plain) == []


def test_jpeg_comment_with_parameters() -> None:
    data = photo(fmt="JPEG", comment=A1111.encode())
    assert [e.generator for e in pngtext.read(data)] == ["stable_diffusion"]


def test_thousands_of_text_chunks_are_bounded() -> None:
    chunks = b"".join(_chunk(b"tEXt", b"k%d\x00v" % i) for i in range(20_000))
    chunks += _chunk(b"tEXt", b"parameters\x00" + A1111.encode("latin-1"))
    data = _insert_chunks(png_with_text([]), chunks)
    assert len(pngtext.png_items(data)) == pngtext.MAX_TEXT_CHUNKS
    assert pngtext.read(data) == []  # the parameters chunk lies beyond the cap
    assert sum(1 for _ in png_chunks(data)) == 10_000


def test_zip_bomb_in_a_compressed_chunk_is_cut_at_the_cap() -> None:
    bomb = zlib.compress(b"Steps: 1, Sampler: x, " + b"A" * (50 * 1024 * 1024), 9)
    data = _insert_chunks(png_with_text([]), _chunk(b"zTXt", b"parameters\x00\x00" + bomb))
    [(key, text)] = pngtext.png_items(data)
    assert key == "parameters" and len(text) == pngtext.MAX_TEXT_BYTES


def test_malformed_chunks_never_raise() -> None:
    base = png_with_text([("tEXt", "parameters", A1111)])
    cases = [
        _insert_chunks(base, _chunk(b"zTXt", b"parameters\x00\x00not zlib")),
        _insert_chunks(base, _chunk(b"iTXt", b"parameters\x00\x01\x00")),
        _insert_chunks(base, _chunk(b"tEXt", b"\x00no key")),
        _insert_chunks(base, struct.pack(">I", 2**31) + b"tEXt"),
        base[:40],
    ]
    for data in cases:
        assert isinstance(pngtext.read(data), list)
        assert isinstance(xmp.read(data), list)
        assert isinstance(exif.read(data), list)
