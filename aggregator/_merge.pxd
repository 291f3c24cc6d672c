# Declarations of the compiled merge ops (see _merge.pyx; the reference is merge.py), so that
# _route.pyx calls `MergePlan.apply_update` as a C call instead of a Python method call.

cimport cython


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
