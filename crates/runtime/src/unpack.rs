//! Layer unpacking: decompression by magic, overlayfs-native whiteouts (0/0 char devices and
//! `trusted.overlay.opaque=y`), and refusal of entries that would escape the layer root.

use std::ffi::CString;
use std::fs;
use std::io::{self, BufRead, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, makedev, mknod};

use crate::error::{Error, Result, io_err, sys_err};

/// How a tarball or layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// plain tar
    None,
    /// gzip (`1f 8b`)
    Gzip,
    /// zstd (`28 b5 2f fd`)
    Zstd,
}

impl Compression {
    /// Detects the compression from the first bytes.
    pub fn from_magic(b: &[u8]) -> Self {
        if b.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if b.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Wraps `r` in the matching decompressor.
pub fn decompress<'a, R: BufRead + 'a>(c: Compression, r: R) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
    })
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Unpacks one layer (any compression) into the empty directory `dest`, converting whiteouts to
/// the overlayfs form. `layer` names the layer in errors.
pub fn unpack_layer<R: BufRead>(mut reader: R, layer: &str, dest: &Path) -> Result<()> {
    let magic = reader
        .fill_buf()
        .map_err(io_err("read layer", dest))?
        .to_vec();
    let c = Compression::from_magic(&magic);
    let r = decompress(c, reader).map_err(io_err("decompress layer into", dest))?;
    let mut ar = tar::Archive::new(r);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    // Xattrs are applied by us, filtered: a layer must never set trusted.* (overlayfs acts on
    // trusted.overlay.*) or security labels other than file capabilities.
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    let unsafe_entry = |entry: &Path, reason: &'static str| Error::UnsafeLayerEntry {
        layer: layer.to_string(),
        entry: entry.display().to_string(),
        reason,
    };
    for entry in ar.entries().map_err(io_err("read layer tar into", dest))? {
        let mut entry = entry.map_err(io_err("read layer entry into", dest))?;
        let raw = entry
            .path()
            .map_err(io_err("read layer entry path into", dest))?
            .into_owned();
        let rel = checked_rel(&raw).map_err(|reason| unsafe_entry(&raw, reason))?;
        if rel.as_os_str().is_empty() {
            continue; // "./" itself
        }
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent = ensure_parents(dest, parent_rel).map_err(|e| match e {
            ParentError::Symlink => unsafe_entry(&raw, "a parent directory is a symlink"),
            ParentError::NotDir => unsafe_entry(&raw, "a parent path is not a directory"),
            ParentError::Io(p, e) => io_err("create parent dir", p)(e),
        })?;
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == OPAQUE_MARKER {
            set_xattr(&parent, "trusted.overlay.opaque", b"y")?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.starts_with(".wh.") || hidden.is_empty() {
                continue; // other aufs metadata
            }
            let target = parent.join(hidden);
            remove_any(&target)?;
            mknod(
                &target,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o000),
                makedev(0, 0),
            )
            .map_err(sys_err(format!("create whiteout {}", target.display())))?;
            continue;
        }
        let target = parent.join(&name);
        let kind = entry.header().entry_type();
        // Never follow whatever is already at the target.
        match fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() && kind.is_dir() => {}
            Ok(_) => remove_any(&target)?,
            Err(_) => {}
        }
        let header = entry.header();
        let uid = header.uid().unwrap_or(0) as u32;
        let gid = header.gid().unwrap_or(0) as u32;
        let mode = header.mode().unwrap_or(0o644);
        if kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(io_err("read hard link in", dest))?
                .ok_or_else(|| unsafe_entry(&raw, "hard link without a target"))?
                .into_owned();
            let lrel = checked_rel(&link).map_err(|reason| unsafe_entry(&link, reason))?;
            let lparent = lrel.parent().unwrap_or(Path::new(""));
            check_no_symlink_parents(dest, lparent)
                .map_err(|_| unsafe_entry(&link, "hard link target goes through a symlink"))?;
            let src = dest.join(&lrel);
            fs::hard_link(&src, &target).map_err(io_err("hard link", &target))?;
            continue;
        }
        if kind == tar::EntryType::Char
            || kind == tar::EntryType::Block
            || kind == tar::EntryType::Fifo
        {
            let (sflag, dev) = match kind {
                tar::EntryType::Char => (SFlag::S_IFCHR, dev_of(header)),
                tar::EntryType::Block => (SFlag::S_IFBLK, dev_of(header)),
                _ => (SFlag::S_IFIFO, 0),
            };
            mknod(&target, sflag, Mode::from_bits_truncate(mode), dev)
                .map_err(sys_err(format!("create device node {}", target.display())))?;
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                .map_err(io_err("chown", &target))?;
            continue;
        }
        let xattrs = allowed_xattrs(&mut entry);
        entry
            .unpack(&target)
            .map_err(io_err("unpack layer entry", &target))?;
        for (name, value) in xattrs {
            set_xattr(&target, &name, &value)?;
        }
    }
    Ok(())
}

/// The entry's xattrs (PAX `SCHILY.xattr.*`) that a layer may set: `user.*` and
/// `security.capability`.
fn allowed_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Vec<(String, Vec<u8>)> {
    let Ok(Some(exts)) = entry.pax_extensions() else {
        return Vec::new();
    };
    exts.flatten()
        .filter_map(|e| {
            let name = e.key().ok()?.strip_prefix("SCHILY.xattr.")?.to_string();
            (name.starts_with("user.") || name == "security.capability")
                .then(|| (name, e.value_bytes().to_vec()))
        })
        .collect()
}

fn dev_of(h: &tar::Header) -> u64 {
    let major = h.device_major().ok().flatten().unwrap_or(0);
    let minor = h.device_minor().ok().flatten().unwrap_or(0);
    makedev(u64::from(major), u64::from(minor))
}

/// Validates an entry path: relative, no `..`. Returns it without `./` parts.
fn checked_rel(p: &Path) -> std::result::Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(out)
}

enum ParentError {
    Symlink,
    NotDir,
    Io(PathBuf, io::Error),
}

fn check_no_symlink_parents(dest: &Path, rel: &Path) -> std::result::Result<(), ParentError> {
    let mut cur = dest.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => return Err(ParentError::Symlink),
            Ok(m) if !m.is_dir() => return Err(ParentError::NotDir),
            Ok(_) => {}
            Err(e) => return Err(ParentError::Io(cur, e)),
        }
    }
    Ok(())
}

/// Creates missing parent dirs of an entry; refuses symlinks among existing ones.
fn ensure_parents(dest: &Path, rel: &Path) -> std::result::Result<PathBuf, ParentError> {
    let mut cur = dest.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => return Err(ParentError::Symlink),
            Ok(m) if !m.is_dir() => return Err(ParentError::NotDir),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(|e| ParentError::Io(cur.clone(), e))?;
            }
            Err(e) => return Err(ParentError::Io(cur, e)),
        }
    }
    Ok(cur)
}

fn remove_any(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(io_err("remove", p)),
        Ok(_) => fs::remove_file(p).map_err(io_err("remove", p)),
        Err(_) => Ok(()),
    }
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::InvalidImage {
        path: path.into(),
        reason: "nul byte in path".into(),
    })?;
    let n = CString::new(name).map_err(|_| Error::InvalidImage {
        path: path.into(),
        reason: "nul byte in xattr name".into(),
    })?;
    // SAFETY: both strings are valid NUL-terminated C strings and value points to value.len() bytes.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(Error::InvalidImage {
            path: path.into(),
            reason: format!("set xattr {name}: {}", io::Error::last_os_error()),
        });
    }
    Ok(())
}
