//! The CUDA backend on a caller's stream. Like `gpu.rs`, each test first opens a GPU; without
//! a driver, NVRTC or device it prints `skipped: <reason>` and passes (run on the GPU machine).
#![cfg(feature = "cuda")]

use std::sync::Arc;

use flashpage::backend::cuda::CudaBackend;
use flashpage::{AttentionOptions, DType, Error, HeadConfig, PlanKind};

#[test]
fn backend_runs_on_the_callers_stream_and_context() {
    let own = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(Error::BackendUnavailable { reason, .. }) => {
            println!("skipped: {reason}");
            return;
        }
        Err(e) => panic!("opening the gpu failed with an unexpected error: {e}"),
    };
    // The engine's context and stream (here: made by cudarc, as candle does).
    let ctx = own.context().clone();
    let engine_stream = ctx.new_stream().unwrap();
    let gpu = CudaBackend::with_stream(engine_stream.clone()).unwrap();
    assert!(Arc::ptr_eq(gpu.stream(), &engine_stream));
    assert!(Arc::ptr_eq(gpu.context(), &ctx));
    let heads = HeadConfig::new(32, 8, 128).unwrap();
    let slots = |b: &CudaBackend| {
        b.parallelism(
            &heads,
            PlanKind::Decode,
            DType::BF16,
            &AttentionOptions::new(),
        )
        .unwrap()
    };
    assert_eq!(slots(&gpu), slots(&own));
    assert!(slots(&gpu) >= gpu.num_sms());
    gpu.synchronize().unwrap();
}

/// A raw `CUstream` of another library (torch's `current_stream().cuda_stream`): the backend
/// enqueues on exactly that handle, on the device's primary context; the legacy default
/// stream (null) is accepted too.
#[test]
fn backend_runs_on_a_raw_stream_of_the_primary_context() {
    let own = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(Error::BackendUnavailable { reason, .. }) => {
            println!("skipped: {reason}");
            return;
        }
        Err(e) => panic!("opening the gpu failed with an unexpected error: {e}"),
    };
    let engine_stream = own.context().new_stream().unwrap();
    let raw = engine_stream.cu_stream();
    // SAFETY: `raw` is a live stream of device 0's primary context (cudarc opens the primary
    // context) and `engine_stream` outlives the backend.
    let gpu = unsafe { CudaBackend::from_raw_stream(0, raw) }.unwrap();
    assert_eq!(gpu.stream().cu_stream(), raw);
    assert_eq!(gpu.context().cu_ctx(), own.context().cu_ctx());
    let heads = HeadConfig::new(32, 8, 128).unwrap();
    let slots = gpu
        .parallelism(
            &heads,
            PlanKind::Decode,
            DType::BF16,
            &AttentionOptions::new(),
        )
        .unwrap();
    assert!(slots >= gpu.num_sms());
    gpu.synchronize().unwrap();
    drop(gpu);
    // The borrowed stream is still usable after the backend is gone.
    engine_stream.synchronize().unwrap();
    // SAFETY: the null stream is the primary context's legacy default stream, always valid.
    let dflt = unsafe { CudaBackend::from_raw_stream(0, std::ptr::null_mut()) }.unwrap();
    dflt.synchronize().unwrap();
}
