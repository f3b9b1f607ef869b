"""The shared results-file writer lives in the package, `edgellm/record.py` (so `edgellm bench --save`
can use it too); import it from there:

    from edgellm.record import Recorder, Table

This module only re-exports it for code that looks for it here.
"""

from edgellm.record import Recorder, Table, machine, read_table, versions, write_json_atomic  # noqa: F401
