"""clipguard.provenance: evidence beside the pixels (C2PA, IPTC/XMP, EXIF, generator text,
hash lists) and the policy that combines it with the classifier. No Kafka in here.

The worker builds one :class:`ProvenanceReader` at start-up, calls ``read`` (or
``inspect``) in its decode stage, and :func:`combine` after inference. See
docs/provenance.md for what each signal proves and what it does not.
"""

from clipguard.provenance.c2pa import C2PA_STATES, C2paState
from clipguard.provenance.errors import ProvenanceConfigError
from clipguard.provenance.evidence import CLAIMS, KINDS, MAX_DETAIL, Claim, Evidence, Kind
from clipguard.provenance.hashlist import HashList, hash_file, pdq_hash
from clipguard.provenance.policy import DecidedBy, PolicyOutcome, combine
from clipguard.provenance.reader import MAX_EVIDENCE, ProvenanceReader, ProvenanceReport
from clipguard.provenance.settings import ALL_READERS, ProvenanceSettings

__all__ = [
    "ALL_READERS",
    "C2PA_STATES",
    "CLAIMS",
    "KINDS",
    "MAX_DETAIL",
    "MAX_EVIDENCE",
    "C2paState",
    "Claim",
    "DecidedBy",
    "Evidence",
    "HashList",
    "Kind",
    "PolicyOutcome",
    "ProvenanceConfigError",
    "ProvenanceReader",
    "ProvenanceReport",
    "ProvenanceSettings",
    "combine",
    "hash_file",
    "pdq_hash",
]
