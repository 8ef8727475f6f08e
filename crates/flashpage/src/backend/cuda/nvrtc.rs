//! Run-time compilation of the kernels with NVRTC, and the on-disk cache of the results.
//!
//! A kernel is compiled for the device's own architecture (`sm_90a` on Hopper) to a CUBIN
//! (PTX when NVRTC cannot emit one) and stored under a key that hashes everything the result
//! depends on: the source text, the compile options, the architecture and the NVRTC version.
//! The cache lives in `$FLASHPAGE_CUDA_CACHE` (`off` disables it), else
//! `$XDG_CACHE_HOME/flashpage`, else `~/.cache/flashpage`. Every entry carries its key and a
//! checksum of its payload: a missing, corrupt or foreign file is a miss, and an unwritable
//! directory only costs the compile next time.

use std::ffi::{CString, OsString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};

use crate::error::{Error, Result};

/// Environment variable that overrides the cache directory (`off` disables the cache).
pub const CACHE_ENV: &str = "FLASHPAGE_CUDA_CACHE";

/// What a compile produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Image {
    /// Device code for the architecture, loaded as is.
    Cubin(Vec<u8>),
    /// PTX text, compiled by the driver at load.
    Ptx(String),
}

impl Image {
    fn tag(&self) -> u8 {
        match self {
            Image::Cubin(_) => 1,
            Image::Ptx(_) => 2,
        }
    }
    fn bytes(&self) -> &[u8] {
        match self {
            Image::Cubin(b) => b,
            Image::Ptx(s) => s.as_bytes(),
        }
    }
}

/// 64-bit FNV-1a, stable across builds and platforms (the cache must outlive the process).
pub(crate) fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    let mut h = h;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The cache key of a compile: source, options, architecture and NVRTC version, each
/// length-prefixed so that no two different inputs concatenate to the same bytes.
pub(crate) fn cache_key(source: &str, options: &[String], arch: &str, nvrtc: (i32, i32)) -> u64 {
    let mut h = FNV_OFFSET;
    let mut field = |b: &[u8]| {
        h = fnv1a(h, &(b.len() as u64).to_le_bytes());
        h = fnv1a(h, b);
    };
    field(source.as_bytes());
    field(&(options.len() as u64).to_le_bytes());
    for o in options {
        field(o.as_bytes());
    }
    field(arch.as_bytes());
    field(&nvrtc.0.to_le_bytes());
    field(&nvrtc.1.to_le_bytes());
    h
}

/// The cache directory from an environment lookup (`None`: caching disabled).
pub(crate) fn cache_dir_from(env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(dir) = set(CACHE_ENV) {
        if dir == "off" {
            return None;
        }
        return Some(PathBuf::from(dir));
    }
    if let Some(xdg) = set("XDG_CACHE_HOME") {
        return Some(PathBuf::from(xdg).join("flashpage"));
    }
    set("HOME").map(|h| PathBuf::from(h).join(".cache").join("flashpage"))
}

/// The cache directory of this process's environment.
pub(crate) fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(|k| std::env::var_os(k))
}

/// The file of entry `key` in `dir`.
pub(crate) fn entry_path(dir: &Path, key: u64) -> PathBuf {
    dir.join(format!("kernel-{key:016x}.bin"))
}

const MAGIC: &[u8; 8] = b"FPCUDA01";
const HEADER: usize = 8 + 1 + 8 + 8 + 8;

/// Serialises an entry: magic, kind, key, payload length, payload checksum, payload.
pub(crate) fn encode_entry(key: u64, image: &Image) -> Vec<u8> {
    let payload = image.bytes();
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(image.tag());
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a(FNV_OFFSET, payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Parses an entry; `None` for anything but an intact entry of `key`.
pub(crate) fn decode_entry(key: u64, bytes: &[u8]) -> Option<Image> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return None;
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let tag = bytes[8];
    if word(9) != key {
        return None;
    }
    let len = usize::try_from(word(17)).ok()?;
    let payload = &bytes[HEADER..];
    if payload.len() != len || fnv1a(FNV_OFFSET, payload) != word(25) {
        return None;
    }
    match tag {
        1 => Some(Image::Cubin(payload.to_vec())),
        2 => String::from_utf8(payload.to_vec()).ok().map(Image::Ptx),
        _ => None,
    }
}

/// Reads entry `key` from `dir` (`None` on any problem).
pub(crate) fn read_entry(dir: &Path, key: u64) -> Option<Image> {
    let bytes = std::fs::read(entry_path(dir, key)).ok()?;
    decode_entry(key, &bytes)
}

/// Writes entry `key` into `dir` atomically (temporary file, then rename). Failures are
/// returned so tests can see them; callers ignore them (the cache is an optimisation).
pub(crate) fn write_entry(dir: &Path, key: u64, image: &Image) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        "kernel-{key:016x}.{}.{:x}.tmp",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::write(&tmp, encode_entry(key, image))?;
    std::fs::rename(&tmp, entry_path(dir, key)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The NVRTC library's version.
pub(crate) fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked by the caller); the call writes two ints.
    let r = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    r.result().map_err(|e| Error::BackendUnavailable {
        backend: "cuda",
        reason: format!("nvrtc version query failed: {e:?}"),
    })?;
    Ok((major, minor))
}

/// A compiler for one architecture, with the disk cache.
#[derive(Debug, Clone)]
pub(crate) struct Compiler {
    pub(crate) arch: String,
    pub(crate) version: (i32, i32),
    pub(crate) cache: Option<PathBuf>,
}

/// Base options of every kernel compile.
fn base_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--lineinfo".into(),
    ]
}

impl Compiler {
    /// Compiles `source` with the `defines` (`-D` options), through the cache.
    pub(crate) fn compile(&self, name: &str, source: &str, defines: &[String]) -> Result<Image> {
        let mut options = base_options(&self.arch);
        options.extend(defines.iter().cloned());
        let key = cache_key(source, &options, &self.arch, self.version);
        if let Some(dir) = &self.cache
            && let Some(img) = read_entry(dir, key)
        {
            return Ok(img);
        }
        let img = compile_uncached(name, source, &options)?;
        if let Some(dir) = &self.cache {
            // An unwritable cache only costs a compile next time.
            let _ = write_entry(dir, key, &img);
        }
        Ok(img)
    }
}

struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by create_program and is destroyed once, here.
        let _ = unsafe { nvrtc_result::destroy_program(self.0) };
    }
}

fn nvrtc_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Backend {
        backend: "cuda",
        message: format!("nvrtc {what} failed: {e:?}"),
    }
}

fn compile_uncached(name: &str, source: &str, options: &[String]) -> Result<Image> {
    let src = CString::new(source).map_err(|e| nvrtc_err("source", e))?;
    let cname = CString::new(name).map_err(|e| nvrtc_err("name", e))?;
    let prog = Program(
        nvrtc_result::create_program(&src, Some(&cname))
            .map_err(|e| nvrtc_err("create program", e))?,
    );
    // SAFETY: prog is a live program; options are plain strings without NULs.
    let compiled = unsafe { nvrtc_result::compile_program(prog.0, options) };
    if let Err(e) = compiled {
        // SAFETY: prog is live; the log is a NUL-terminated char buffer.
        let log = unsafe { nvrtc_result::get_program_log(prog.0) }
            .map(|raw| {
                let bytes: Vec<u8> = raw
                    .iter()
                    .map(|&c| c as u8)
                    .take_while(|&c| c != 0)
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        return Err(Error::Backend {
            backend: "cuda",
            message: format!(
                "nvrtc could not compile {name} ({e:?}) with options {options:?}: {}",
                log.trim()
            ),
        });
    }
    let mut size = 0usize;
    // SAFETY: prog is live and compiled; the call writes one usize.
    let cubin_ok = unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .is_ok();
    if cubin_ok && size > 0 {
        let mut buf = vec![0u8; size];
        // SAFETY: buf holds exactly the size NVRTC reported.
        unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast()) }
            .result()
            .map_err(|e| nvrtc_err("get cubin", e))?;
        return Ok(Image::Cubin(buf));
    }
    // SAFETY: prog is live and compiled.
    let ptx = unsafe { nvrtc_result::get_ptx(prog.0) }.map_err(|e| nvrtc_err("get ptx", e))?;
    let bytes: Vec<u8> = ptx
        .iter()
        .map(|&c| c as u8)
        .take_while(|&c| c != 0)
        .collect();
    Ok(Image::Ptx(String::from_utf8_lossy(&bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn key_depends_on_every_input() {
        let opts = vec!["-DA=1".to_string(), "-DB=2".to_string()];
        let base = cache_key("src", &opts, "sm_90a", (13, 0));
        assert_eq!(base, cache_key("src", &opts, "sm_90a", (13, 0)));
        assert_ne!(base, cache_key("src!", &opts, "sm_90a", (13, 0)));
        assert_ne!(base, cache_key("src", &opts[..1], "sm_90a", (13, 0)));
        assert_ne!(base, cache_key("src", &opts, "sm_80", (13, 0)));
        assert_ne!(base, cache_key("src", &opts, "sm_90a", (13, 1)));
        assert_ne!(base, cache_key("src", &opts, "sm_90a", (12, 0)));
        // Field boundaries matter: moving a character between fields changes the key.
        let a = cache_key("ab", &["c".to_string()], "x", (1, 0));
        let b = cache_key("a", &["bc".to_string()], "x", (1, 0));
        assert_ne!(a, b);
    }

    #[test]
    fn cache_dir_precedence() {
        let d = cache_dir_from(env(&[
            (CACHE_ENV, "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ]));
        assert_eq!(d, Some(PathBuf::from("/c")));
        let d = cache_dir_from(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")]));
        assert_eq!(d, Some(PathBuf::from("/x/flashpage")));
        let d = cache_dir_from(env(&[("HOME", "/h"), (CACHE_ENV, "")]));
        assert_eq!(d, Some(PathBuf::from("/h/.cache/flashpage")));
        assert_eq!(
            cache_dir_from(env(&[(CACHE_ENV, "off"), ("HOME", "/h")])),
            None
        );
        assert_eq!(cache_dir_from(env(&[])), None);
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "flashpage-cache-test-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn entries_round_trip() {
        let dir = temp_dir("rt");
        let cubin = Image::Cubin(vec![0x7f, b'E', b'L', b'F', 0, 1, 2, 3]);
        let ptx = Image::Ptx(".version 8.0\n.target sm_90a\n".into());
        write_entry(&dir, 1, &cubin).unwrap();
        write_entry(&dir, 2, &ptx).unwrap();
        assert_eq!(read_entry(&dir, 1), Some(cubin));
        assert_eq!(read_entry(&dir, 2), Some(ptx));
        assert_eq!(read_entry(&dir, 3), None);
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_or_foreign_entries_are_misses() {
        let dir = temp_dir("corrupt");
        let img = Image::Cubin((0..200u8).collect());
        write_entry(&dir, 7, &img).unwrap();
        let path = entry_path(&dir, 7);
        let good = std::fs::read(&path).unwrap();
        assert_eq!(decode_entry(7, &good), Some(img.clone()));
        // Wrong key (e.g. a renamed file).
        assert_eq!(decode_entry(8, &good), None);
        // A flipped payload byte.
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(decode_entry(7, &bad), None);
        // Truncated.
        assert_eq!(decode_entry(7, &good[..good.len() - 1]), None);
        assert_eq!(decode_entry(7, &good[..10]), None);
        // Bad magic and unknown kind.
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode_entry(7, &bad), None);
        let mut bad = good.clone();
        bad[8] = 9;
        assert_eq!(decode_entry(7, &bad), None);
        // A corrupt file on disk reads as a miss.
        std::fs::write(&path, b"garbage").unwrap();
        assert_eq!(read_entry(&dir, 7), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_cache_is_an_error_not_a_panic() {
        let dir = temp_dir("ro");
        // A regular file where the directory should be: create_dir_all fails.
        let blocker = dir.join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let img = Image::Ptx("x".into());
        assert!(write_entry(&blocker.join("sub"), 1, &img).is_err());
        assert_eq!(read_entry(&blocker.join("sub"), 1), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
