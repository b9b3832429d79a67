"""Prefect tasks: thin wrappers around `swirl_core` calls (retries, names, logging).

Importing any of them (a Dask worker does, to run one) lets model configs name their API key's
Prefect Secret block: the library reads it through `read_secret` in the process that makes the calls.
"""

from swirl_core.llm.factory import use_secret_reader
from tasks.secrets import read_secret

use_secret_reader(read_secret)
