"""The Virtool application: samples, jobs, uploads, FASTQ statistics, access rules, users and
keys, and NCBI, on vtrio's framework.

It uses the framework only through :mod:`vtrio.framework`'s public names, and is used by the
composition root (:mod:`vtrio.server`) and the command line through the names below. Its
private modules:

- ``_collections``: the collections, declared once: what their messages carry, who sees them
- ``_access``: who may see and change a sample and its jobs
- ``_auth``: users and API keys
- ``_samples``, ``_job_methods``, ``_system``: the JSON-RPC methods
- ``_jobs``: the job runner (service ``jobs``)
- ``_uploads``: the folder of reads files
- ``_fastq``: read statistics of FASTQ files, in worker processes
- ``_ncbi``, ``_genbank``: GenBank records from NCBI
- ``_dashboard`` and ``dashboard/``: the live dashboard, a page that uses vtrio.js
"""

from vtrio.virtool._access import RIGHTS as RIGHTS
from vtrio.virtool._access import access_of as access_of
from vtrio.virtool._access import can_read as can_read
from vtrio.virtool._access import can_write as can_write
from vtrio.virtool._access import readable_filter as readable_filter
from vtrio.virtool._access import writable_filter as writable_filter
from vtrio.virtool._auth import AuthError as AuthError
from vtrio.virtool._auth import Identity as Identity
from vtrio.virtool._auth import authenticate as authenticate
from vtrio.virtool._auth import closing_revoked_keys as closing_revoked_keys
from vtrio.virtool._auth import create_key as create_key
from vtrio.virtool._auth import create_user as create_user
from vtrio.virtool._auth import hash_key as hash_key
from vtrio.virtool._auth import identity_of as identity_of
from vtrio.virtool._auth import list_keys as list_keys
from vtrio.virtool._auth import revoke_key as revoke_key
from vtrio.virtool._auth import well_formed as well_formed
from vtrio.virtool._collections import COLLECTIONS as COLLECTIONS
from vtrio.virtool._dashboard import DASHBOARD as DASHBOARD
from vtrio.virtool._fastq import DEFAULT_CHUNK_SIZE as DEFAULT_CHUNK_SIZE
from vtrio.virtool._fastq import FastqError as FastqError
from vtrio.virtool._fastq import ReadStats as ReadStats
from vtrio.virtool._fastq import chunk_stats as chunk_stats
from vtrio.virtool._fastq import read_statistics as read_statistics
from vtrio.virtool._job_methods import CreateParams as CreateJobParams
from vtrio.virtool._job_methods import JobMethods as JobMethods
from vtrio.virtool._job_methods import count_by_state as count_by_state
from vtrio.virtool._jobs import JobRunner as JobRunner
from vtrio.virtool._jobs import runner_name as runner_name
from vtrio.virtool._ncbi import NCBIClient as NCBIClient
from vtrio.virtool._samples import CreateParams as CreateSampleParams
from vtrio.virtool._samples import IdParams as IdParams
from vtrio.virtool._samples import SampleMethods as SampleMethods
from vtrio.virtool._samples import UpdateParams as UpdateSampleParams
from vtrio.virtool._system import SystemMethods as SystemMethods
from vtrio.virtool._uploads import Uploads as Uploads
from vtrio.virtool._uploads import UploadsMismatch as UploadsMismatch
from vtrio.virtool._uploads import open_uploads as open_uploads

__all__ = [
    "COLLECTIONS",
    "DASHBOARD",
    "DEFAULT_CHUNK_SIZE",
    "RIGHTS",
    "AuthError",
    "CreateJobParams",
    "CreateSampleParams",
    "FastqError",
    "IdParams",
    "Identity",
    "JobMethods",
    "JobRunner",
    "NCBIClient",
    "ReadStats",
    "SampleMethods",
    "SystemMethods",
    "UpdateSampleParams",
    "Uploads",
    "UploadsMismatch",
    "access_of",
    "authenticate",
    "can_read",
    "can_write",
    "chunk_stats",
    "closing_revoked_keys",
    "count_by_state",
    "create_key",
    "create_user",
    "hash_key",
    "identity_of",
    "list_keys",
    "open_uploads",
    "read_statistics",
    "readable_filter",
    "revoke_key",
    "runner_name",
    "well_formed",
    "writable_filter",
]
