// The __half kernels and their host entry points: its statistics and every form's gradient sweep (one
// translation unit per input type so the build compiles them in parallel).
#include "launch.cuh"

TILECL_INSTANTIATE(__half, half, kFloat16)
