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
