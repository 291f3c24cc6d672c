# Declarations of the compiled merge ops (see _merge.pyx; the reference is merge.py), so that
# _route.pyx calls `MergePlan.apply_update` as a C call instead of a Python method call.

cimport cython

cdef enum:
    OP_SET = 0
    OP_MERGE = 1
    OP_UNSET = 2
    OP_UPSERT = 3
    OP_REMOVE = 4
    OP_ADD = 5
    OP_DELETE = 6

cdef enum:
    SRC_NONE = 0      # unset/remove/delete take no value
    SRC_LITERAL = 1   # immutable literal, used as is
    SRC_LITERAL_COPY = 2  # dict/list literal, deep-copied on every use
    SRC_ATTR = 3      # an event attribute (data, id, time, ...), None is missing
    SRC_DATA = 4      # a path below event.data


@cython.final
cdef class _Op:
    """One row of a plan's table (see merge.OpEntry)."""
    cdef int code
    cdef str where
    cdef tuple parents  # the path without its last segment
    cdef str last       # the last segment ("" for merge into the root)
    cdef bint root      # merge into the root (empty path)
    cdef tuple jparents  # parents as orjson key bytes (quotes included); None: unencodable
    cdef bytes jlast     # last as orjson key bytes
    cdef int src
    cdef str src_attr
    cdef Py_ssize_t src_off  # src_attr's Event slot offset, -1: not a slot
    cdef tuple src_path
    cdef str src_missing  # the MergeError message of a missing value
    cdef object literal
    cdef bint has_id
    cdef int id_src
    cdef str id_attr
    cdef Py_ssize_t id_off
    cdef tuple id_path
    cdef str id_missing
    cdef tuple fields   # None: no projection
    cdef bint negate
    cdef bint clone


cdef object _value(_Op op, object ev)
cdef str _entry_id(_Op op, object ev)



@cython.final
cdef class MergePlan:
    cdef tuple _rows
    cdef Py_ssize_t _n
    cdef readonly tuple ops
    cdef readonly bint writes
    cdef readonly bint deletes
    cdef readonly bint atomic

    cpdef object apply(self, object doc, object event)
    cpdef object apply_update(self, dict stored, object event)
