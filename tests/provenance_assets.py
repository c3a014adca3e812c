"""Real test assets for the provenance readers: certificates, signed images, metadata.

Everything is made here with the real libraries: a throwaway root CA and signer
certificate (``cryptography``), Content Credentials signed by ``c2pa-python``, and images
with EXIF, XMP and text chunks written by Pillow.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from dataclasses import dataclass
from pathlib import Path

import c2pa
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image, PngImagePlugin

DST = "http://cv.iptc.org/newscodes/digitalsourcetype/"
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "clipguard tests"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def _usage(*, sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not sign,
        crl_sign=not sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Authority:
    """A root CA and one signer certificate it issued (ES256)."""

    root_pem: bytes
    chain_pem: bytes  # signer certificate, then the root
    key_pem: bytes

    def signer(self) -> c2pa.Signer:
        info = c2pa.C2paSignerInfo(
            alg=c2pa.C2paSigningAlg.ES256,
            sign_cert=self.chain_pem,
            private_key=self.key_pem,
            ta_url=None,  # no timestamp authority: nothing may touch the network
        )
        return c2pa.Signer.from_info(info)

    def write_root(self, path: Path) -> Path:
        path.write_bytes(self.root_pem)
        return path


def make_authority(name: str = "Test") -> Authority:
    now = dt.datetime.now(dt.timezone.utc)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} Root CA"))
        .issuer_name(_name(f"{name} Root CA"))
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} Signer"))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(sign=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Authority(_pem(root), _pem(cert) + _pem(root), key_pem)


def photo(size: tuple[int, int] = (96, 72), seed: int = 0, fmt: str = "JPEG", **save) -> bytes:
    """A textured image (PDQ needs structure) in the given format."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


def actions_manifest(generator: str, actions: list[dict]) -> dict:
    return {
        "claim_generator_info": [{"name": generator, "version": "1.0"}],
        "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}}],
    }


def ai_manifest(agent: str = "DALL-E") -> dict:
    created = {
        "action": "c2pa.created",
        "digitalSourceType": DST + "trainedAlgorithmicMedia",
        "softwareAgent": {"name": agent},
    }
    return actions_manifest("Image Generator", [created])


def capture_manifest() -> dict:
    created = {"action": "c2pa.created", "digitalSourceType": DST + "digitalCapture"}
    return actions_manifest("Camera Firmware", [created])


def _builder_context() -> c2pa.Context:
    return c2pa.Context.from_dict(
        {
            "builder": {"thumbnail": {"enabled": False}},
            "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False},
        }
    )


def sign(
    authority: Authority,
    source: bytes,
    fmt: str,
    manifest: dict,
    ingredient: tuple[bytes, str] | None = None,
) -> bytes:
    """``source`` with an embedded manifest signed by ``authority``.

    ``ingredient``: (bytes, format) of a parent image; the manifest's ``c2pa.opened``
    action must then name the ingredient id ``parent``.
    """
    with c2pa.Builder(json.dumps(manifest), _builder_context()) as builder:
        if ingredient is not None:
            parent, parent_fmt = ingredient
            description = {
                "title": "parent",
                "relationship": "parentOf",
                "instance_id": "parent",
                "label": "parent",
            }
            builder.add_ingredient(json.dumps(description), MIME[parent_fmt], io.BytesIO(parent))
        out = io.BytesIO()
        with authority.signer() as signer:
            builder.sign(signer, MIME[fmt], io.BytesIO(source), out)
    return out.getvalue()


def edit_manifest(extra: dict | None = None) -> dict:
    opened = {"action": "c2pa.opened", "parameters": {"ingredientIds": ["parent"]}}
    adjusted = {"action": "c2pa.color_adjustments"}
    return actions_manifest("Photo Editor", [opened, adjusted, *([extra] if extra else [])])


def xmp_packet(body: str) -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about=""'
        ' xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
        ' xmlns:xmp="http://ns.adobe.com/xap/1.0/"'
        f"{body}"
        "</rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


def png_with_text(chunks: list[tuple[str, str, str]], size: tuple[int, int] = (32, 24)) -> bytes:
    """A PNG with (type, key, text) chunks: type ``tEXt``, ``zTXt`` or ``iTXt``."""
    info = PngImagePlugin.PngInfo()
    for ctype, key, text in chunks:
        if ctype == "tEXt":
            info.add_text(key, text)
        elif ctype == "zTXt":
            info.add_text(key, text, zip=True)
        else:
            info.add_itxt(key, text, zip=ctype == "iTXt-z")
    out = io.BytesIO()
    Image.new("RGB", size, (40, 90, 160)).save(out, "PNG", pnginfo=info)
    return out.getvalue()
