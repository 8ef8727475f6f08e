//! The CUDA backend on a caller's stream. Like `gpu.rs`, each test first opens a GPU; without
//! a driver, NVRTC or device it prints `skipped: <reason>` and passes (run on the GPU machine).
#![cfg(feature = "cuda")]

use std::sync::Arc;

use flashpage::Error;
use flashpage::backend::cuda::CudaBackend;

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
    assert_eq!(gpu.parallelism(), own.parallelism());
    assert_eq!(gpu.parallelism(), gpu.num_sms() * 4);
    gpu.synchronize().unwrap();
    // A raw stream borrowed from another library.
    // SAFETY: the stream belongs to `ctx` and `engine_stream` keeps it alive for the test.
    let raw = unsafe { ctx.wrap_borrowed_stream(engine_stream.cu_stream()) };
    let borrowed = CudaBackend::with_stream(raw).unwrap();
    assert_eq!(**borrowed.stream(), *engine_stream);
    borrowed.synchronize().unwrap();
}
