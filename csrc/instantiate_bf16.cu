// The __nv_bfloat16 kernels and their host entry points (one translation unit per input type so the
// build compiles them in parallel).
#include "kernels.cuh"

TILECL_INSTANTIATE(__nv_bfloat16, bf16)
