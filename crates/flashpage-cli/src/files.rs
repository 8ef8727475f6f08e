//! Reading inputs and writing outputs safely: every read is bounded (by a documented cap or
//! by the sizes the file declares), every output path is checked before any work starts (not
//! an input, not a directory or device, in a writable directory), and outputs are written
//! through a temporary file in the same directory and renamed, so a failed run never leaves
//! a half-written output.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::CliError;

/// The largest batch JSON `flashpage plan` reads: 64 MiB (about 8 million page ids). A
/// larger file, or a stream that does not end (`/dev/zero`), is refused once the cap is
/// passed, before it can exhaust memory.
pub const MAX_BATCH_JSON_BYTES: u64 = 64 << 20;

/// The largest safetensors header `flashpage run` reads (the limit of the safetensors
/// format itself: 100 MB).
pub const MAX_SAFETENSORS_HEADER_BYTES: u64 = 100_000_000;

/// Reads at most `cap` bytes from `r`; more is an error naming `name` and the cap.
pub fn read_capped(mut r: impl Read, name: &str, cap: u64) -> Result<Vec<u8>, CliError> {
    let mut buf = Vec::new();
    r.by_ref()
        .take(cap.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| CliError::invalid(format!("cannot read {name}: {e}")))?;
    if buf.len() as u64 > cap {
        return Err(CliError::invalid(format!(
            "{name} is larger than the limit of {cap} bytes"
        )));
    }
    Ok(buf)
}

/// Reads a file of at most `cap` bytes (a regular file is measured first, so an oversized
/// one is refused without reading it; any other file is read up to the cap).
pub fn read_file_capped(path: &Path, name: &str, cap: u64) -> Result<Vec<u8>, CliError> {
    let f = File::open(path).map_err(|e| CliError::invalid(format!("cannot read {name}: {e}")))?;
    if let Ok(m) = f.metadata()
        && m.is_file()
        && m.len() > cap
    {
        return Err(CliError::invalid(format!(
            "{name} has {} bytes, more than the limit of {cap} bytes",
            m.len()
        )));
    }
    read_capped(f, name, cap)
}

/// Reads a safetensors file, bounded by the size its header declares: the 8-byte header
/// length (at most [`MAX_SAFETENSORS_HEADER_BYTES`]), the header, then exactly the data
/// bytes the header's offsets cover (which the format ties to the declared shapes and
/// dtypes). A regular file shorter than it declares is refused before its data is read;
/// a stream is never read past the declared end.
pub fn read_safetensors_bounded(path: &Path, name: &str) -> Result<Vec<u8>, CliError> {
    let bad =
        |why: String| CliError::invalid(format!("{name} is not a valid safetensors file: {why}"));
    let mut f = File::open(path)
        .map_err(|e| CliError::invalid(format!("cannot read input file {name}: {e}")))?;
    let file_len = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8)
        .map_err(|e| bad(format!("cannot read the 8-byte header length: {e}")))?;
    let n = u64::from_le_bytes(len8);
    if n > MAX_SAFETENSORS_HEADER_BYTES {
        return Err(bad(format!(
            "the header declares {n} bytes, more than the limit of {MAX_SAFETENSORS_HEADER_BYTES}"
        )));
    }
    if let Some(len) = file_len
        && n > len.saturating_sub(8)
    {
        return Err(bad(format!(
            "the header declares {n} bytes but the file has only {len}"
        )));
    }
    let header = read_capped(Read::by_ref(&mut f).take(n), name, n)?;
    if header.len() as u64 != n {
        return Err(bad(format!(
            "the header declares {n} bytes but only {} could be read",
            header.len()
        )));
    }
    let data_len = declared_data_len(&header).map_err(bad)?;
    let total = 8u64
        .checked_add(n)
        .and_then(|x| x.checked_add(data_len))
        .ok_or_else(|| bad(format!("the declared data size {data_len} overflows")))?;
    if let Some(len) = file_len
        && len != total
    {
        return Err(bad(format!(
            "the header declares {total} bytes in all but the file has {len}"
        )));
    }
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(usize::try_from(total).unwrap_or(usize::MAX))
        .map_err(|_| bad(format!("cannot hold the {total} bytes it declares")))?;
    bytes.extend_from_slice(&len8);
    bytes.extend_from_slice(&header);
    f.take(data_len)
        .read_to_end(&mut bytes)
        .map_err(|e| CliError::invalid(format!("cannot read input file {name}: {e}")))?;
    if bytes.len() as u64 != total {
        return Err(bad(format!(
            "the header declares {total} bytes in all but the input ended after {}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// The data bytes a safetensors header declares: the largest end offset of its tensors.
fn declared_data_len(header: &[u8]) -> Result<u64, String> {
    let v: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("the header is not valid json: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "the header is not a json object".to_string())?;
    let mut end = 0u64;
    for (k, t) in obj {
        if k == "__metadata__" {
            continue;
        }
        let off = t
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| format!("tensor {k:?} has no valid data_offsets"))?;
        end = end.max(off.1);
    }
    Ok(end)
}

/// An output path checked before any work: where it will be written, and the temporary
/// file (already created, in the same directory) the data goes through.
#[derive(Debug)]
pub struct PreparedOutput {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
}

/// The path as the filesystem resolves it: the canonical parent joined with the file name
/// (the file itself may not exist yet), or the canonical file when it exists (symlinks
/// resolved).
fn resolved(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = std::fs::canonicalize(path) {
        return Some(p);
    }
    let name = path.file_name()?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(std::fs::canonicalize(parent).ok()?.join(name))
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
    false
}

/// Checks `output` before any work starts (invalid input, exit status 2, nothing written):
/// it must not be any of `inputs` (compared as resolved paths and, when it exists, as the
/// same file, so hard links and symlinks are caught), must not be a directory or other
/// non-regular file, and its directory must exist and be writable: the temporary file the
/// output is written through is created there now.
pub fn prepare_output(output: &Path, inputs: &[&Path]) -> Result<PreparedOutput, CliError> {
    let shown = output.display();
    let out_meta = std::fs::metadata(output).ok();
    let out_res = resolved(output);
    for input in inputs {
        let same_path = out_res.is_some() && out_res == resolved(input);
        let same_id = match (&out_meta, std::fs::metadata(input)) {
            (Some(o), Ok(i)) => same_file(o, &i),
            _ => false,
        };
        if same_path || same_id {
            return Err(CliError::invalid(format!(
                "--output {shown} is the input file {}: refusing to overwrite it (choose another output path)",
                input.display()
            )));
        }
    }
    if let Some(m) = &out_meta {
        if m.is_dir() {
            return Err(CliError::invalid(format!(
                "--output {shown} is a directory, expected a file path"
            )));
        }
        if !m.is_file() {
            return Err(CliError::invalid(format!(
                "--output {shown} exists and is not a regular file (a device, pipe or socket): expected a file path"
            )));
        }
    }
    let Some(name) = output.file_name() else {
        return Err(CliError::invalid(format!(
            "--output {shown} does not name a file"
        )));
    };
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(CliError::invalid(format!(
                "--output {shown}: {} is not a directory",
                dir.display()
            )));
        }
        Err(e) => {
            return Err(CliError::invalid(format!(
                "--output {shown}: directory {} does not exist or cannot be read: {e}",
                dir.display()
            )));
        }
    }
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| {
            CliError::invalid(format!(
                "--output {shown}: cannot create a file in {}: {e}",
                dir.display()
            ))
        })?;
    Ok(PreparedOutput {
        path: output.to_path_buf(),
        tmp,
        file: Some(file),
    })
}

impl PreparedOutput {
    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `data` to the temporary file, flushes it to disk and renames it over the
    /// output. On any error the temporary file is removed and the output is untouched
    /// (failure, exit status 1).
    pub fn commit(mut self, data: &[u8]) -> Result<(), CliError> {
        let shown = self.path.display().to_string();
        let Some(mut file) = self.file.take() else {
            return Err(CliError::failure(format!(
                "cannot write output file {shown}: already written"
            )));
        };
        file.write_all(data)
            .and_then(|()| file.sync_all())
            .map_err(|e| CliError::failure(format!("cannot write output file {shown}: {e}")))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| CliError::failure(format!("cannot write output file {shown}: {e}")))?;
        // Renamed: nothing left to clean up.
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for PreparedOutput {
    /// A run that fails (or an output never committed) leaves no temporary file behind.
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file.take();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_reads_stop_at_the_cap() {
        let zeros = std::io::repeat(0).take(1 << 20);
        let e = read_capped(zeros, "stream", 1000).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.message.contains("limit of 1000 bytes"), "{}", e.message);
        assert_eq!(read_capped(&b"abc"[..], "s", 3).unwrap(), b"abc");
    }

    #[test]
    fn declared_data_len_is_the_largest_end() {
        let h = br#"{"__metadata__":{"a":"b"},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        assert_eq!(declared_data_len(h).unwrap(), 12);
        assert!(declared_data_len(br#"{"x":{"data_offsets":[0]}}"#).is_err());
    }
}
