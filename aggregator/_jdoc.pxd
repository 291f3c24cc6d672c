# Declarations of the JSON-bytes merge engine (see _jdoc.pyx), so that _route.pyx calls it as
# a C call.

from aggregator._merge cimport MergePlan

cpdef object apply(MergePlan plan, object j, object event)
cpdef void count_refused()
