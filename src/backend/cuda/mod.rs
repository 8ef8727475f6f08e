//! The CUDA backend (feature `cuda`): kernels compiled at run time with NVRTC.
