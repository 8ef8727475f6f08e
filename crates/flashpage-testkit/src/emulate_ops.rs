//! The append and RoPE kernels (`kernels/ops.cu`) without a GPU: `emulation/ops_emulation.cpp`
//! runs the kernel source on the host over the very parameter block the backend launches
//! ([`flashpage::backend::cuda::ops::append_params`] / `rope_params`, built with buffer
//! offsets in place of device addresses). A missing C++ compiler is an error (set `CXX`),
//! never a skip.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use flashpage::backend::cuda::KERNEL_SOURCES;
use flashpage::backend::cuda::ops::OpsParams;

const DRIVER: (&str, &str) = (
    "ops_emulation.cpp",
    include_str!("../emulation/ops_emulation.cpp"),
);

/// A built emulator of `ops.cu` in a scratch directory (removed on drop).
pub struct OpsEmulator {
    dir: PathBuf,
    exe: OnceLock<PathBuf>,
    cxx: String,
}

impl OpsEmulator {
    /// Finds a C++20 compiler (`CXX`, `g++` or `c++`) and writes the sources to a fresh
    /// scratch directory named after `tag`; the emulator is built on first use.
    pub fn new(tag: &str) -> Result<OpsEmulator, String> {
        let cxx = crate::emulate::compiler()
            .ok_or("no C++ compiler found to build the kernel emulator: install g++ or set CXX")?;
        let dir = std::env::temp_dir().join(format!(
            "flashpage-ops-emulation-{}-{tag}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for (name, text) in KERNEL_SOURCES.iter().chain(std::iter::once(&DRIVER)) {
            std::fs::write(dir.join(name), text).map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(OpsEmulator {
            dir,
            exe: OnceLock::new(),
            cxx,
        })
    }

    fn exe(&self) -> &PathBuf {
        self.exe.get_or_init(|| {
            let exe = self.dir.join("ops-emu");
            let out = Command::new(&self.cxx)
                .args(["-std=c++20", "-O1", "-ffp-contract=off"])
                .arg(self.dir.join("ops_emulation.cpp"))
                .arg("-o")
                .arg(&exe)
                .output()
                .expect("running the C++ compiler");
            assert!(
                out.status.success(),
                "ops emulator build failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            exe
        })
    }

    /// Runs entry `append` or `rope` on `params` (pointer fields: byte offsets into their
    /// buffers) over the 10 buffers in pointer-field order (an empty buffer: the pointer is
    /// absent; an empty `v_dst` buffer: V lives in `k_dst`'s). Returns buffers 0..4 (`k_src`,
    /// `v_src`, `k_dst`, `v_dst`) after the launch. Panics if the emulated kernel wrote past
    /// the end of any buffer.
    pub fn run(&self, entry: &str, params: &OpsParams, bufs: [&[u8]; 10]) -> [Vec<u8>; 4] {
        let mut input = params.as_bytes().to_vec();
        for b in bufs {
            input.extend_from_slice(&(b.len() as u64).to_le_bytes());
            input.extend_from_slice(b);
        }
        let tag = format!("{:?}", std::thread::current().id())
            .replace(|c: char| !c.is_ascii_alphanumeric(), "");
        let (inp, outp) = (
            self.dir.join(format!("in-{tag}")),
            self.dir.join(format!("out-{tag}")),
        );
        std::fs::write(&inp, &input).unwrap();
        let st = Command::new(self.exe())
            .arg(entry)
            .arg(&inp)
            .arg(&outp)
            .status()
            .unwrap();
        assert!(st.success(), "ops emulator ({entry}) failed: {st}");
        let out = std::fs::read(&outp).unwrap();
        let mut at = 0;
        let mut res: [Vec<u8>; 4] = Default::default();
        for (i, r) in res.iter_mut().enumerate() {
            let n = bufs[i].len();
            *r = out[at..at + n].to_vec();
            at += n;
        }
        assert_eq!(at, out.len(), "emulator output size");
        res
    }
}

impl Drop for OpsEmulator {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
