//! Finding the driver, NVRTC and a device without ever letting a missing library panic.
//!
//! `cudarc` loads `libcuda` and `libnvrtc` lazily and panics when a symbol cannot be
//! resolved, so their presence is checked first with `is_culib_present` (which only tries to
//! open them) and every later initialisation call runs under `catch_unwind`: whatever goes
//! wrong becomes [`Error::BackendUnavailable`].

use std::sync::Arc;

use cudarc::driver::{CudaContext, sys as driver_sys};

use crate::error::{Error, Result};

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: "cuda",
        reason: reason.into(),
    }
}

/// Checks that the driver library and NVRTC can be loaded.
pub(crate) fn check_libraries() -> Result<()> {
    // SAFETY: is_culib_present only attempts to dlopen the candidate library names and makes
    // no CUDA call.
    if !unsafe { driver_sys::is_culib_present() } {
        return Err(unavailable(
            "libcuda (the nvidia driver library) was not found: no nvidia driver is installed",
        ));
    }
    // SAFETY: as above, for libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(unavailable(
            "libnvrtc (the cuda run-time compiler, from the cuda toolkit) was not found",
        ));
    }
    Ok(())
}

/// Runs `f`, turning a panic inside cudarc (a missing symbol) into an error.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(unavailable(format!("{what} failed: {msg}")))
        }
    }
}

/// What the backend needs to know about its device.
#[derive(Debug, Clone)]
pub(crate) struct DeviceInfo {
    pub(crate) name: String,
    pub(crate) compute_capability: (i32, i32),
    pub(crate) sms: usize,
}

/// The NVRTC architecture for a compute capability: `sm_90a` on Hopper (for its
/// architecture-specific instructions), `sm_XY` elsewhere.
pub(crate) fn arch_for(cc: (i32, i32)) -> String {
    if cc == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{}{}", cc.0, cc.1)
    }
}

/// Checks that NVRTC `nvrtc` (supporting `archs`, e.g. `[75, 80, ..]`) can compile for a
/// device of compute capability `cc`: the reason, naming both, when it cannot.
pub(crate) fn check_architecture(
    cc: (i32, i32),
    nvrtc: (i32, i32),
    archs: &[i32],
) -> std::result::Result<(), String> {
    let lowest = archs.iter().copied().min();
    match lowest {
        Some(low) if cc.0 * 10 + cc.1 >= low => Ok(()),
        Some(low) => Err(format!(
            "compute capability {}.{} is below sm_{low}, the lowest architecture nvrtc {}.{} compiles for",
            cc.0, cc.1, nvrtc.0, nvrtc.1
        )),
        None => Err(format!(
            "nvrtc {}.{} reports no supported architecture",
            nvrtc.0, nvrtc.1
        )),
    }
}

/// Opens device `ordinal`'s primary context.
pub(crate) fn open(ordinal: usize) -> Result<(Arc<CudaContext>, DeviceInfo)> {
    check_libraries()?;
    guarded("cuda initialisation", || {
        let count = CudaContext::device_count()
            .map_err(|e| unavailable(format!("cannot initialise the cuda driver: {e:?}")))?;
        if count <= 0 {
            return Err(unavailable("the cuda driver reports no device"));
        }
        if ordinal >= count as usize {
            return Err(unavailable(format!(
                "device ordinal {ordinal} does not exist: {count} cuda devices"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| unavailable(format!("cannot open cuda device {ordinal}: {e:?}")))?;
        let info = describe_unguarded(&ctx)?;
        Ok((ctx, info))
    })
}

/// What the backend needs to know about the device of `ctx` (a context of the caller's, for
/// a backend on the caller's stream).
pub(crate) fn describe(ctx: &Arc<CudaContext>) -> Result<DeviceInfo> {
    check_libraries()?;
    guarded("cuda device query", || describe_unguarded(ctx))
}

fn describe_unguarded(ctx: &Arc<CudaContext>) -> Result<DeviceInfo> {
    let ordinal = ctx.ordinal();
    let cc = ctx
        .compute_capability()
        .map_err(|e| unavailable(format!("cannot query device {ordinal}: {e:?}")))?;
    let sms = ctx
        .attribute(driver_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| unavailable(format!("cannot query device {ordinal}: {e:?}")))?;
    let name = ctx.name().unwrap_or_else(|_| "unknown".into());
    let nvrtc = super::nvrtc::nvrtc_version()?;
    let archs = super::nvrtc::supported_archs()?;
    check_architecture(cc, nvrtc, &archs)
        .map_err(|reason| unavailable(format!("device {ordinal} ({name}): {reason}")))?;
    Ok(DeviceInfo {
        name,
        compute_capability: cc,
        sms: sms.max(1) as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_names() {
        assert_eq!(arch_for((9, 0)), "sm_90a");
        assert_eq!(arch_for((8, 9)), "sm_89");
        assert_eq!(arch_for((8, 0)), "sm_80");
        assert_eq!(arch_for((10, 0)), "sm_100");
    }

    #[test]
    fn architecture_floor_names_device_and_compiler() {
        let nvrtc13 = [75, 80, 86, 87, 88, 89, 90, 100, 103, 107, 110, 120, 121];
        assert_eq!(check_architecture((9, 0), (13, 0), &nvrtc13), Ok(()));
        assert_eq!(check_architecture((7, 5), (13, 0), &nvrtc13), Ok(()));
        let e = check_architecture((7, 0), (13, 0), &nvrtc13).unwrap_err();
        assert!(
            e.contains("7.0") && e.contains("sm_75") && e.contains("13.0"),
            "{e}"
        );
        assert!(check_architecture((9, 0), (13, 0), &[]).is_err());
    }

    #[test]
    fn panics_become_unavailable() {
        let r: Result<()> = guarded("probe", || panic!("symbol cuFoo not found"));
        match r {
            Err(Error::BackendUnavailable { backend, reason }) => {
                assert_eq!(backend, "cuda");
                assert!(reason.contains("cuFoo"), "{reason}");
            }
            other => panic!("expected BackendUnavailable, got {other:?}"),
        }
    }
}
