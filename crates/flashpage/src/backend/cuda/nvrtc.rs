//! Run-time compilation of the kernels with NVRTC, and the on-disk cache of the results.
//!
//! A kernel is compiled for the device's own architecture (`sm_90a` on Hopper) to a CUBIN
//! (PTX when NVRTC cannot emit one) and stored under a key that hashes everything the result
//! depends on: the source text, the compile options, the architecture and the NVRTC version.
//! The cache lives in `$FLASHPAGE_CUDA_CACHE` (`off` disables it), else
//! `$XDG_CACHE_HOME/flashpage`, else `~/.cache/flashpage`. Every entry carries its key and a
//! checksum of its payload: a missing, corrupt or foreign file is a miss, and an unwritable
//! directory only costs the compile next time.
//!
//! NVRTC's log is kept even when a compile succeeds: with `--ptxas-options=-v` it carries
//! ptxas's resource report (registers, spill stores and loads, stack frame, shared memory),
//! which [`parse_resources`] reads, and any warning. The log is stored in the cache entry
//! beside the image, so a cache hit has the same record as the compile that produced it. This
//! needs only `libnvrtc` (NVRTC embeds ptxas): no driver, no GPU, no toolkit binaries.

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
    /// Bytes of the image.
    pub(crate) fn len(&self) -> usize {
        self.bytes().len()
    }
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

const MAGIC: &[u8; 8] = b"FPCUDA02";
const HEADER: usize = 8 + 1 + 8 + 8 + 8 + 8;

/// A compile's record: the image, NVRTC's log (warnings and ptxas's resource report) and the
/// wall time of the compile that produced it (milliseconds).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Compiled {
    pub(crate) image: Image,
    pub(crate) log: String,
    pub(crate) compile_ms: f64,
    /// Whether this record came from the disk cache.
    pub(crate) cached: bool,
}

/// Serialises an entry: magic, kind, key, image length, log length, checksum of image and
/// log, compile time (f64 bits), image, log.
pub(crate) fn encode_entry(key: u64, c: &Compiled) -> Vec<u8> {
    let payload = c.image.bytes();
    let log = c.log.as_bytes();
    let mut out = Vec::with_capacity(HEADER + 8 + payload.len() + log.len());
    out.extend_from_slice(MAGIC);
    out.push(c.image.tag());
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&(log.len() as u64).to_le_bytes());
    let sum = fnv1a(fnv1a(FNV_OFFSET, payload), log);
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(&c.compile_ms.to_bits().to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(log);
    out
}

/// Parses an entry; `None` for anything but an intact entry of `key`.
pub(crate) fn decode_entry(key: u64, bytes: &[u8]) -> Option<Compiled> {
    if bytes.len() < HEADER + 8 || &bytes[..8] != MAGIC {
        return None;
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let tag = bytes[8];
    if word(9) != key {
        return None;
    }
    let len = usize::try_from(word(17)).ok()?;
    let log_len = usize::try_from(word(25)).ok()?;
    let compile_ms = f64::from_bits(word(41));
    let rest = &bytes[HEADER + 8..];
    if rest.len() != len.checked_add(log_len)? {
        return None;
    }
    let (payload, log) = rest.split_at(len);
    if fnv1a(fnv1a(FNV_OFFSET, payload), log) != word(33) {
        return None;
    }
    let log = String::from_utf8(log.to_vec()).ok()?;
    let image = match tag {
        1 => Image::Cubin(payload.to_vec()),
        2 => Image::Ptx(String::from_utf8(payload.to_vec()).ok()?),
        _ => return None,
    };
    Some(Compiled {
        image,
        log,
        compile_ms,
        cached: true,
    })
}

/// Reads entry `key` from `dir` (`None` on any problem).
pub(crate) fn read_entry(dir: &Path, key: u64) -> Option<Compiled> {
    let bytes = std::fs::read(entry_path(dir, key)).ok()?;
    decode_entry(key, &bytes)
}

/// Writes entry `key` into `dir` atomically (temporary file, then rename). Failures are
/// returned so tests can see them; the backend ignores them (the cache is an optimisation),
/// `flashpage kernels --cache` reports them.
pub(crate) fn write_entry(dir: &Path, key: u64, image: &Compiled) -> std::io::Result<()> {
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

/// The architectures (`75` for `sm_75`, ...) the loaded NVRTC can compile for.
pub(crate) fn supported_archs() -> Result<Vec<i32>> {
    let mut n = 0;
    // SAFETY: the library is present (checked by the caller); the call writes one int.
    let r = unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut n) };
    r.result().map_err(|e| Error::BackendUnavailable {
        backend: "cuda",
        reason: format!("nvrtc architecture query failed: {e:?}"),
    })?;
    let mut archs = vec![0i32; n.max(0) as usize];
    if !archs.is_empty() {
        // SAFETY: archs holds exactly the number of ints NVRTC reported.
        let r = unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) };
        r.result().map_err(|e| Error::BackendUnavailable {
            backend: "cuda",
            reason: format!("nvrtc architecture query failed: {e:?}"),
        })?;
    }
    Ok(archs)
}

/// A compiler for one architecture, with the disk cache.
#[derive(Debug, Clone)]
pub(crate) struct Compiler {
    pub(crate) arch: String,
    pub(crate) version: (i32, i32),
    pub(crate) cache: Option<PathBuf>,
}

/// Base options of every kernel compile. NVRTC's spelling matters: it rejects nvcc's
/// `--lineinfo` (NVRTC_ERROR_INVALID_OPTION), its own is `--generate-line-info`.
/// `--ptxas-options=-v` puts ptxas's resource report into the log.
pub(crate) fn base_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--generate-line-info".into(),
        "--ptxas-options=-v".into(),
    ]
}

impl Compiler {
    /// Compiles `source` with the `defines` (`-D` options), through the cache.
    pub(crate) fn compile(&self, name: &str, source: &str, defines: &[String]) -> Result<Compiled> {
        self.compile_with(name, source, defines, true)
    }

    /// The cached record of `source` with `defines`, if the cache holds one (the lookup
    /// [`Compiler::compile`] starts with).
    pub(crate) fn lookup(&self, source: &str, defines: &[String]) -> Option<Compiled> {
        let mut options = base_options(&self.arch);
        options.extend(defines.iter().cloned());
        let key = cache_key(source, &options, &self.arch, self.version);
        read_entry(self.cache.as_ref()?, key)
    }

    /// Compiles `source`; with `read_cache` false the cache is only written (a fresh compile
    /// whose record replaces any entry, as `flashpage kernels --cache` does).
    pub(crate) fn compile_with(
        &self,
        name: &str,
        source: &str,
        defines: &[String],
        read_cache: bool,
    ) -> Result<Compiled> {
        let mut options = base_options(&self.arch);
        options.extend(defines.iter().cloned());
        let key = cache_key(source, &options, &self.arch, self.version);
        if read_cache
            && let Some(dir) = &self.cache
            && let Some(c) = read_entry(dir, key)
        {
            return Ok(c);
        }
        let c = compile_uncached(name, source, &options)?;
        if let Some(dir) = &self.cache {
            let written = write_entry(dir, key, &c);
            if !read_cache {
                written.map_err(|e| Error::Backend {
                    backend: "cuda",
                    message: format!("cannot write the kernel cache {}: {e}", dir.display()),
                })?;
            }
            // Otherwise an unwritable cache only costs a compile next time.
        }
        Ok(c)
    }
}

/// Resources of one compiled kernel, from ptxas's report in NVRTC's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of spill stores (the entry function and every function it calls).
    pub spill_store_bytes: u32,
    /// Bytes of spill loads (likewise).
    pub spill_load_bytes: u32,
    /// Static shared memory per block, in bytes.
    pub shared_bytes: u32,
    /// Stack per thread, in bytes: the entry's frame or the cumulative stack size of its
    /// call tree, whichever is larger.
    pub stack_bytes: u32,
}

fn number_before(part: &str, suffix: &str) -> Option<u32> {
    part.trim().strip_suffix(suffix)?.trim().parse().ok()
}

/// Reads the resources of entry function `entry` from a ptxas `-v` report.
///
/// The report's lines, for each function of the compile:
/// `ptxas info    : Function properties for NAME` followed by
/// `ptxas         .     S bytes stack frame, X bytes spill stores, Y bytes spill loads`,
/// and for each entry `ptxas info    : Compiling entry function 'NAME' for 'sm_90a'` then
/// `ptxas info    : Used R registers, used 1 barriers[, C bytes cumulative stack size], M bytes smem`.
/// `None` when the report lacks the entry's register line.
pub fn parse_resources(log: &str, entry: &str) -> Option<Resources> {
    let mut r = Resources::default();
    let mut in_entry = false;
    let mut props_of: Option<String> = None;
    let mut found = false;
    for line in log.lines() {
        let body = line
            .trim()
            .strip_prefix("ptxas")
            .unwrap_or(line)
            .trim_start_matches(|c: char| c == '.' || c == ':' || c.is_whitespace());
        if let Some(rest) = line.trim().strip_prefix("ptxas info") {
            let rest = rest.trim_start_matches([' ', ':']).trim();
            if let Some(name) = rest.strip_prefix("Compiling entry function '") {
                in_entry = name.split('\'').next() == Some(entry);
                continue;
            }
            if let Some(name) = rest.strip_prefix("Function properties for ") {
                props_of = Some(name.trim().to_string());
                continue;
            }
            if in_entry && rest.starts_with("Used ") {
                for part in rest.split(',') {
                    let part = part.trim();
                    if let Some(n) = part
                        .strip_prefix("Used ")
                        .and_then(|p| number_before(p, "registers"))
                    {
                        r.registers = n;
                        found = true;
                    } else if let Some(n) = number_before(part, "bytes smem") {
                        r.shared_bytes = n;
                    } else if let Some(n) = number_before(part, "bytes cumulative stack size") {
                        r.stack_bytes = r.stack_bytes.max(n);
                    }
                }
                in_entry = false;
            }
            continue;
        }
        if let Some(name) = props_of.take() {
            // The properties line of the function named just before.
            for part in body.split(',') {
                if let Some(n) = number_before(part, "bytes stack frame") {
                    if name == entry {
                        r.stack_bytes = r.stack_bytes.max(n);
                    }
                } else if let Some(n) = number_before(part, "bytes spill stores") {
                    r.spill_store_bytes += n;
                } else if let Some(n) = number_before(part, "bytes spill loads") {
                    r.spill_load_bytes += n;
                }
            }
        }
    }
    found.then_some(r)
}

/// The warnings in NVRTC's log (lines with `warning`), without ptxas's report.
pub fn log_warnings(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("warning") && !l.trim_start().starts_with("ptxas info"))
        .map(|l| l.trim().to_string())
        .collect()
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

fn compile_uncached(name: &str, source: &str, options: &[String]) -> Result<Compiled> {
    let src = CString::new(source).map_err(|e| nvrtc_err("source", e))?;
    let cname = CString::new(name).map_err(|e| nvrtc_err("name", e))?;
    let started = std::time::Instant::now();
    let prog = Program(
        nvrtc_result::create_program(&src, Some(&cname))
            .map_err(|e| nvrtc_err("create program", e))?,
    );
    // SAFETY: prog is a live program; options are plain strings without NULs.
    let compiled = unsafe { nvrtc_result::compile_program(prog.0, options) };
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    // The log, kept on success too (warnings, ptxas's resource report).
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
    if let Err(e) = compiled {
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
        return Ok(Compiled {
            image: Image::Cubin(buf),
            log,
            compile_ms,
            cached: false,
        });
    }
    // SAFETY: prog is live and compiled.
    let ptx = unsafe { nvrtc_result::get_ptx(prog.0) }.map_err(|e| nvrtc_err("get ptx", e))?;
    let bytes: Vec<u8> = ptx
        .iter()
        .map(|&c| c as u8)
        .take_while(|&c| c != 0)
        .collect();
    Ok(Compiled {
        image: Image::Ptx(String::from_utf8_lossy(&bytes).into_owned()),
        log,
        compile_ms,
        cached: false,
    })
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

    /// A record as the cache returns it (`cached` set), with a log.
    fn record(image: Image) -> Compiled {
        Compiled {
            image,
            log: "ptxas info    : Used 40 registers".into(),
            compile_ms: 12.5,
            cached: true,
        }
    }

    #[test]
    fn entries_round_trip() {
        let dir = temp_dir("rt");
        let cubin = record(Image::Cubin(vec![0x7f, b'E', b'L', b'F', 0, 1, 2, 3]));
        let ptx = record(Image::Ptx(".version 8.0\n.target sm_90a\n".into()));
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
        let img = record(Image::Cubin((0..200u8).collect()));
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
        // A flipped log byte (the log is checksummed too).
        let mut bad = good.clone();
        let at = bad.len() - 3;
        bad[at] ^= 1;
        assert_eq!(decode_entry(7, &bad), None);
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
        let img = record(Image::Ptx("x".into()));
        assert!(write_entry(&blocker.join("sub"), 1, &img).is_err());
        assert_eq!(read_entry(&blocker.join("sub"), 1), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// ptxas reports as NVRTC 13.5 prints them with `--ptxas-options=-v`.
    const REPORT: &str = "decode.cu(96): warning #177-D: function \"f16_bits_to_f32\" was declared but never referenced
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'fp_decode' for 'sm_90a'
ptxas info    : Function properties for fp_decode
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 230 registers, used 1 barriers, 16640 bytes smem
ptxas info    : Compile time = 2100.902 ms
";
    const SPILLING: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'fp_decode' for 'sm_90a'
ptxas info    : Function properties for fp_decode
ptxas         .     80 bytes stack frame, 100 bytes spill stores, 108 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 96 bytes cumulative stack size, 4672 bytes smem
ptxas info    : Function properties for __internal_trig_reduction_slowpathd
ptxas         .     40 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Compile time = 703.213 ms
";

    #[test]
    fn resource_report_is_parsed() {
        assert_eq!(
            parse_resources(REPORT, "fp_decode"),
            Some(Resources {
                registers: 230,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
                shared_bytes: 16640,
                stack_bytes: 0,
            })
        );
        assert_eq!(
            parse_resources(SPILLING, "fp_decode"),
            Some(Resources {
                registers: 128,
                spill_store_bytes: 104,
                spill_load_bytes: 116,
                shared_bytes: 4672,
                stack_bytes: 96,
            })
        );
        // Another entry, or no report at all: nothing.
        assert_eq!(parse_resources(REPORT, "fp_merge"), None);
        assert_eq!(parse_resources("", "fp_decode"), None);
        assert_eq!(log_warnings(REPORT).len(), 1);
        assert!(log_warnings(SPILLING).is_empty());
    }

    #[test]
    fn options_are_nvrtc_spellings() {
        let o = base_options("sm_90a");
        assert!(o.contains(&"--generate-line-info".to_string()), "{o:?}");
        assert!(
            !o.iter().any(|x| x == "--lineinfo" || x == "-lineinfo"),
            "{o:?}"
        );
        assert!(o.contains(&"--ptxas-options=-v".to_string()), "{o:?}");
    }
}
