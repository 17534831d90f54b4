// The float kernels and their host entry points (one translation unit per input type so the
// build compiles them in parallel).
#include "kernels.cuh"

TILECL_INSTANTIATE(float, float)
