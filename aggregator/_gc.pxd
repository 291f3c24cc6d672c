# Per-record containers made untracked by the cyclic garbage collector at their creation.
#
# CPython links every tracked container (tuple, list, instance of a class with slots...)
# into the collector's doubly-linked generation list and unlinks it when it is freed,
# writing the headers of its two neighbours in that list. A record's tuples and lists are
# freed at the end of the transaction, long after they were made and in another order, so
# both neighbours are cold memory: two cache misses per container freed (callgrind's
# cache simulation, bench.tools.cache_profile: PyObject_GC_UnTrack). Unlinked right after
# creation, the neighbours are the containers made just before (hot), and the free only
# reads the object's own header.
#
# Only for containers that can never be part of a reference cycle (they hold records,
# events, decoded JSON/msgpack, feeds, keys): the collector does not look into an untracked
# container, so a cycle through one would never be freed. Nothing else changes: the worker
# runs the collector between transactions only (runtime.tune_gc), when these are gone.

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)


cdef inline object untracked(object o):
    """`o`, no longer tracked by the cyclic collector (see above); `o` must be a container
    of a GC type (tuple, list, a class instance) that no reference cycle can go through."""
    PyObject_GC_UnTrack(<void*>o)
    return o
