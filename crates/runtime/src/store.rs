//! The image store: content-addressed blobs, a name → manifest index, tarball import and
//! once-per-layer unpacking into overlayfs lower dirs.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result, io_err};
use crate::reference::normalize;
use crate::unpack::{Compression, decompress, unpack_layer};

/// Media type of an OCI image manifest.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A content descriptor (OCI and Docker v2 schema 2 share this shape).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// media type of the referenced content
    #[serde(default)]
    pub media_type: String,
    /// `sha256:<hex>`
    pub digest: String,
    /// size in bytes
    #[serde(default)]
    pub size: u64,
    /// annotations (ref names live here in an OCI layout index)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// platform, in an index
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// The platform of one manifest in an index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Platform {
    /// e.g. `amd64`
    pub architecture: String,
    /// e.g. `linux`
    pub os: String,
    /// e.g. `v7`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// the image config blob
    pub config: Descriptor,
    /// the layer blobs, bottom first
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

/// The runtime-relevant part of an image config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageConfig {
    /// `Env`
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    /// `Entrypoint`
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    /// `WorkingDir`
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    /// `User`
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ImageConfig>,
    #[serde(default)]
    architecture: Option<String>,
}

/// One named image in the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageEntry {
    /// the normalised name
    pub name: String,
    /// digest of its manifest blob
    pub manifest_digest: String,
}

/// An image resolved for running a container.
#[derive(Debug, Clone)]
pub struct Image {
    /// normalised name (or the digest reference)
    pub name: String,
    /// manifest digest (the image id)
    pub manifest_digest: String,
    /// the manifest
    pub manifest: Manifest,
    /// the runtime config
    pub config: ImageConfig,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IndexFile {
    images: BTreeMap<String, String>,
}

/// A content-addressed image store under one directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

fn sha256_hex(digest: &str) -> Result<&str> {
    match digest.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(h)
        }
        _ => Err(Error::InvalidImage {
            path: PathBuf::from(digest),
            reason: "digest must be sha256:<64 lowercase hex>".into(),
        }),
    }
}

/// The lock of one layer's unpacking (see [`ImageStore::unpack`]).
fn unpacking(dst: &Path) -> std::sync::Arc<std::sync::Mutex<()>> {
    use std::sync::{Arc, Mutex, OnceLock};
    static MAP: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    let map = MAP.get_or_init(|| Mutex::new(HashMap::new()));
    let mut m = map
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    m.entry(dst.to_path_buf()).or_default().clone()
}

/// Reads the first bytes of a file and says how it is compressed.
pub(crate) fn sniff(path: &Path) -> Result<Compression> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        let r = f.read(&mut magic[n..]).map_err(io_err("read", path))?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(Compression::from_magic(&magic[..n]))
}

impl ImageStore {
    /// Opens (creating if needed) a store rooted at `root` (e.g. `<data-dir>/agent/images`).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for d in ["blobs/sha256", "layers/sha256", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err("create image store dir", &p))?;
        }
        Ok(Self { root })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a blob (whether or not it exists).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(sha256_hex(digest)?))
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    /// Writes a blob from `reader`, verifying it against `expected` when given; the blob appears
    /// atomically (rename) only once complete. Returns its digest and size.
    pub fn write_blob(
        &self,
        reader: &mut dyn Read,
        expected: Option<&str>,
    ) -> Result<(String, u64)> {
        let tmp = self.tmp_path("blob");
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        let res = (|| -> Result<()> {
            loop {
                let n = reader
                    .read(&mut buf)
                    .map_err(io_err("read blob for", &tmp))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                f.write_all(&buf[..n]).map_err(io_err("write", &tmp))?;
                size += n as u64;
            }
            f.sync_all().map_err(io_err("sync", &tmp))?;
            Ok(())
        })();
        drop(f);
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        if let Some(exp) = expected
            && exp != digest
        {
            let _ = fs::remove_file(&tmp);
            return Err(Error::DigestMismatch {
                what: "blob".into(),
                expected: exp.into(),
                actual: digest,
            });
        }
        let dst = self.blob_path(&digest)?;
        fs::rename(&tmp, &dst).map_err(io_err("rename blob into", &dst))?;
        Ok((digest, size))
    }

    fn write_blob_bytes(&self, data: &[u8]) -> Result<(String, u64)> {
        self.write_blob(&mut &data[..], None)
    }

    /// Reads a whole (small) blob.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.blob_path(digest)?;
        fs::read(&p).map_err(io_err("read blob", &p))
    }

    fn with_index<T>(&self, f: impl FnOnce(&mut IndexFile) -> Result<(T, bool)>) -> Result<T> {
        let lock_path = self.root.join("index.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        // SAFETY: flock on a valid open descriptor; the lock is released when `lock` is closed.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io_err("lock", &lock_path)(std::io::Error::last_os_error()));
        }
        let path = self.root.join("index.json");
        let mut index: IndexFile = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => IndexFile::default(),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let (out, changed) = f(&mut index)?;
        if changed {
            let tmp = self.tmp_path("index");
            let data = serde_json::to_vec_pretty(&index).map_err(|source| Error::Json {
                path: tmp.clone(),
                source,
            })?;
            fs::write(&tmp, data).map_err(io_err("write", &tmp))?;
            fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
        }
        drop(lock);
        Ok(out)
    }

    /// Points `name` (normalised here) at a manifest that is already in the store.
    pub fn tag(&self, name: &str, manifest_digest: &str) -> Result<String> {
        let name = normalize(name)?;
        let manifest = self.load_manifest(manifest_digest)?;
        for d in std::iter::once(&manifest.config).chain(manifest.layers.iter()) {
            if !self.blob_path(&d.digest)?.exists() {
                return Err(Error::InvalidImage {
                    path: self.root.clone(),
                    reason: format!(
                        "manifest {manifest_digest} references missing blob {}",
                        d.digest
                    ),
                });
            }
        }
        let n = name.clone();
        let d = manifest_digest.to_string();
        self.with_index(move |idx| {
            idx.images.insert(n, d);
            Ok(((), true))
        })?;
        Ok(name)
    }

    /// All named images.
    pub fn list(&self) -> Result<Vec<ImageEntry>> {
        self.with_index(|idx| {
            Ok((
                idx.images
                    .iter()
                    .map(|(n, d)| ImageEntry {
                        name: n.clone(),
                        manifest_digest: d.clone(),
                    })
                    .collect(),
                false,
            ))
        })
    }

    /// Removes a name from the index (blobs stay until garbage collection).
    pub fn untag(&self, reference: &str) -> Result<bool> {
        let name = normalize(reference)?;
        self.with_index(|idx| {
            let removed = idx.images.remove(&name).is_some();
            Ok((removed, removed))
        })
    }

    fn load_manifest(&self, digest: &str) -> Result<Manifest> {
        let bytes = self.read_blob(digest)?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: self.blob_path(digest).unwrap_or_default(),
            source,
        })
    }

    /// Finds an image by reference (normalised) or by manifest digest.
    pub fn resolve(&self, reference: &str) -> Result<Image> {
        let (name, digest) = if reference.starts_with("sha256:") {
            (reference.to_string(), reference.to_string())
        } else {
            let name = normalize(reference)?;
            let n = name.clone();
            let d = self.with_index(|idx| Ok((idx.images.get(&n).cloned(), false)))?;
            match d {
                Some(d) => (name, d),
                None => return Err(Error::ImageNotFound(name)),
            }
        };
        let manifest = self.load_manifest(&digest)?;
        let cfg_bytes = self.read_blob(&manifest.config.digest)?;
        let cfg: ConfigFile = serde_json::from_slice(&cfg_bytes).map_err(|source| Error::Json {
            path: self.blob_path(&manifest.config.digest).unwrap_or_default(),
            source,
        })?;
        Ok(Image {
            name,
            manifest_digest: digest,
            manifest,
            config: cfg.config.unwrap_or_default(),
        })
    }

    /// Unpacks (once) every layer of `image` and returns the layer dirs, bottom layer first.
    pub fn unpacked_layers(&self, image: &Image) -> Result<Vec<PathBuf>> {
        image
            .manifest
            .layers
            .iter()
            .map(|l| self.unpack(&l.digest))
            .collect()
    }

    /// Unpacks one layer blob (once) and returns its directory. Concurrent calls for one layer
    /// in this process wait for the first instead of each unpacking it (a burst of pods of one
    /// image starts together).
    pub fn unpack(&self, digest: &str) -> Result<PathBuf> {
        let hex = sha256_hex(digest)?;
        let dst = self.root.join("layers/sha256").join(hex);
        if dst.is_dir() {
            return Ok(dst);
        }
        let lock = unpacking(&dst);
        let _guard = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if dst.is_dir() {
            return Ok(dst);
        }
        let blob = self.blob_path(digest)?;
        let tmp = self.tmp_path("layer");
        fs::create_dir(&tmp).map_err(io_err("create", &tmp))?;
        let res = File::open(&blob)
            .map_err(io_err("open layer blob", &blob))
            .and_then(|f| unpack_layer(BufReader::new(f), digest, &tmp));
        if let Err(e) = res {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        match fs::rename(&tmp, &dst) {
            Ok(()) => Ok(dst),
            Err(_) if dst.is_dir() => {
                // Another unpacker won the race; theirs is identical.
                let _ = fs::remove_dir_all(&tmp);
                Ok(dst)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(io_err("rename layer into", &dst)(e))
            }
        }
    }

    /// Imports an OCI-layout or `docker save` tarball (plain, gzip or zstd). Images without a
    /// name in the archive get `default_name`. Returns the names imported.
    pub fn import(&self, archive: &Path, default_name: Option<&str>) -> Result<Vec<String>> {
        let bad = |reason: String| Error::InvalidImage {
            path: archive.to_path_buf(),
            reason,
        };
        let compression = sniff(archive)?;
        let file = File::open(archive).map_err(io_err("open", archive))?;
        let reader =
            decompress(compression, BufReader::new(file)).map_err(io_err("decompress", archive))?;
        let mut tar = tar::Archive::new(reader);
        let mut files: HashMap<String, (String, u64)> = HashMap::new();
        let mut small: HashMap<String, Vec<u8>> = HashMap::new();
        let mut links: HashMap<String, String> = HashMap::new();
        for entry in tar.entries().map_err(io_err("read tar", archive))? {
            let mut entry = entry.map_err(io_err("read tar entry in", archive))?;
            let raw = entry
                .path()
                .map_err(io_err("read tar entry path in", archive))?
                .into_owned();
            let Some(path) = clean_rel(&raw) else {
                return Err(bad(format!("entry {} escapes the archive", raw.display())));
            };
            let kind = entry.header().entry_type();
            if kind.is_symlink() || kind.is_hard_link() {
                if let Some(target) = entry.link_name().map_err(io_err("read link in", archive))? {
                    let base = if kind.is_symlink() {
                        Path::new(&path)
                            .parent()
                            .map(Path::to_path_buf)
                            .unwrap_or_default()
                            .join(target)
                    } else {
                        target.into_owned()
                    };
                    if let Some(t) = clean_rel(&base) {
                        links.insert(path, t);
                    }
                }
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let keep = path.ends_with(".json") || path == "oci-layout" || path == "repositories";
            let (digest, size) = if keep {
                let mut data = Vec::new();
                entry
                    .read_to_end(&mut data)
                    .map_err(io_err("read", archive))?;
                let r = self.write_blob_bytes(&data)?;
                small.insert(path.clone(), data);
                r
            } else {
                self.write_blob(&mut entry, None)?
            };
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                let expected = format!("sha256:{hex}");
                if expected != digest {
                    return Err(Error::DigestMismatch {
                        what: format!("{} in {}", path, archive.display()),
                        expected,
                        actual: digest,
                    });
                }
            }
            files.insert(path, (digest, size));
        }
        let lookup = |p: &str| -> Option<(String, u64)> {
            let mut p = p.to_string();
            for _ in 0..16 {
                if let Some(v) = files.get(&p) {
                    return Some(v.clone());
                }
                p = links.get(&p)?.clone();
            }
            None
        };
        let mut names = Vec::new();
        if let Some(index) = small
            .get("index.json")
            .filter(|_| small.contains_key("oci-layout") || !small.contains_key("manifest.json"))
        {
            let index: Index = serde_json::from_slice(index).map_err(|source| Error::Json {
                path: archive.join("index.json"),
                source,
            })?;
            for desc in &index.manifests {
                let ann = desc.annotations.clone().unwrap_or_default();
                let name = ann
                    .get("io.containerd.image.name")
                    .or_else(|| {
                        ann.get("org.opencontainers.image.ref.name")
                            .filter(|n| n.contains('/') || n.contains(':') && !n.contains('@'))
                    })
                    .cloned()
                    .or_else(|| default_name.map(str::to_string));
                let Some(name) = name else {
                    return Err(bad(format!(
                        "manifest {} has no image name annotation; give a name to import it under",
                        desc.digest
                    )));
                };
                let manifest_digest = self.select_platform(desc)?;
                names.push(self.tag(&name, &manifest_digest)?);
            }
        } else if let Some(m) = small.get("manifest.json") {
            #[derive(Deserialize)]
            #[serde(rename_all = "PascalCase")]
            struct DockerEntry {
                config: String,
                #[serde(default)]
                repo_tags: Option<Vec<String>>,
                layers: Vec<String>,
            }
            let entries: Vec<DockerEntry> =
                serde_json::from_slice(m).map_err(|source| Error::Json {
                    path: archive.join("manifest.json"),
                    source,
                })?;
            for e in entries {
                let (cfg_digest, cfg_size) =
                    lookup(&e.config).ok_or_else(|| bad(format!("config {} missing", e.config)))?;
                let mut layers = Vec::new();
                for l in &e.layers {
                    let (d, size) = lookup(l).ok_or_else(|| bad(format!("layer {l} missing")))?;
                    let media_type = match sniff(&self.blob_path(&d)?)? {
                        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
                        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
                        Compression::None => "application/vnd.oci.image.layer.v1.tar",
                    };
                    layers.push(Descriptor {
                        media_type: media_type.into(),
                        digest: d,
                        size,
                        annotations: None,
                        platform: None,
                    });
                }
                let manifest = serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": MEDIA_OCI_MANIFEST,
                    "config": Descriptor { media_type: MEDIA_OCI_CONFIG.into(), digest: cfg_digest, size: cfg_size, annotations: None, platform: None },
                    "layers": layers,
                });
                let bytes = serde_json::to_vec(&manifest).map_err(|source| Error::Json {
                    path: archive.to_path_buf(),
                    source,
                })?;
                let (mdigest, _) = self.write_blob_bytes(&bytes)?;
                let tags = e.repo_tags.unwrap_or_default();
                if tags.is_empty() {
                    let Some(n) = default_name else {
                        return Err(bad(
                            "image has no RepoTags; give a name to import it under".into()
                        ));
                    };
                    names.push(self.tag(n, &mdigest)?);
                }
                for t in tags {
                    names.push(self.tag(&t, &mdigest)?);
                }
            }
        } else {
            return Err(bad(
                "neither an OCI layout (index.json) nor a docker save archive (manifest.json)"
                    .into(),
            ));
        }
        // Unpack now, as containerd does on import, so the first container of the image does
        // not wait for it.
        for n in &names {
            let image = self.resolve(n)?;
            self.unpacked_layers(&image)?;
        }
        tracing::info!(archive = %archive.display(), images = ?names, "imported images");
        Ok(names)
    }

    /// Follows an index descriptor to the manifest for this machine's platform.
    fn select_platform(&self, desc: &Descriptor) -> Result<String> {
        let mut desc = desc.clone();
        for _ in 0..4 {
            if desc.media_type != MEDIA_OCI_INDEX && desc.media_type != MEDIA_DOCKER_LIST {
                return Ok(desc.digest);
            }
            let bytes = self.read_blob(&desc.digest)?;
            let index: Index = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                path: self.blob_path(&desc.digest).unwrap_or_default(),
                source,
            })?;
            let arch = host_arch();
            let found = index
                .manifests
                .iter()
                .find(|m| {
                    m.platform.as_ref().is_some_and(|p| {
                        p.os == "linux"
                            && p.architecture == arch.0
                            && (arch.1.is_none() || p.variant.as_deref() == arch.1)
                    })
                })
                .or_else(|| {
                    index.manifests.iter().find(|m| {
                        m.platform
                            .as_ref()
                            .is_some_and(|p| p.os == "linux" && p.architecture == arch.0)
                    })
                })
                .or_else(|| {
                    if index.manifests.len() == 1 {
                        index.manifests.first()
                    } else {
                        None
                    }
                });
            match found {
                Some(m) => desc = m.clone(),
                None => {
                    return Err(Error::InvalidImage {
                        path: self.blob_path(&desc.digest)?,
                        reason: format!("no manifest for linux/{} in the image index", arch.0),
                    });
                }
            }
        }
        Err(Error::InvalidImage {
            path: self.root.clone(),
            reason: "image indexes nested too deep".into(),
        })
    }

    /// Bytes used by blobs and unpacked layers.
    pub fn disk_usage(&self) -> u64 {
        crate::runtime::dir_bytes(&self.root.join("blobs"))
            + crate::runtime::dir_bytes(&self.root.join("layers"))
    }

    /// Used and total bytes of the file system holding the store.
    pub fn fs_usage(&self) -> Result<(u64, u64)> {
        let st = nix::sys::statvfs::statvfs(&self.root).map_err(crate::error::sys_err(format!(
            "statvfs {}",
            self.root.display()
        )))?;
        let frag = st.fragment_size() as u64;
        let total = st.blocks() as u64 * frag;
        let free = st.blocks_available() as u64 * frag;
        Ok((total.saturating_sub(free), total))
    }

    /// Deletes every blob and unpacked layer not reachable from a named image or from one of
    /// `keep` (manifest digests of images containers still use). Returns the bytes freed.
    pub fn gc(&self, keep: &[String]) -> Result<u64> {
        let mut roots: Vec<String> = self
            .list()?
            .into_iter()
            .map(|e| e.manifest_digest)
            .collect();
        roots.extend(keep.iter().cloned());
        let mut live = std::collections::HashSet::new();
        for m in roots {
            let Ok(manifest) = self.load_manifest(&m) else {
                continue;
            };
            live.insert(m);
            live.insert(manifest.config.digest.clone());
            for l in &manifest.layers {
                live.insert(l.digest.clone());
            }
        }
        let mut freed = 0u64;
        for (dir, is_dir) in [("blobs/sha256", false), ("layers/sha256", true)] {
            let d = self.root.join(dir);
            for e in fs::read_dir(&d).map_err(io_err("read", &d))?.flatten() {
                let digest = format!("sha256:{}", e.file_name().to_string_lossy());
                if live.contains(&digest) {
                    continue;
                }
                let p = e.path();
                freed += if is_dir {
                    0
                } else {
                    e.metadata().map(|m| m.len()).unwrap_or(0)
                };
                let r = if is_dir {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                r.map_err(io_err("remove unused image data", &p))?;
            }
        }
        tracing::info!(freed_bytes = freed, "image garbage collection");
        Ok(freed)
    }

    /// The config's architecture field of an image, for diagnostics.
    pub fn architecture(&self, image: &Image) -> Option<String> {
        let bytes = self.read_blob(&image.manifest.config.digest).ok()?;
        serde_json::from_slice::<ConfigFile>(&bytes)
            .ok()?
            .architecture
    }
}

/// This machine's OCI platform (architecture, variant).
pub fn host_arch() -> (&'static str, Option<&'static str>) {
    match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", None),
        "arm" => ("arm", Some("v7")),
        other => (other, None),
    }
}

/// A relative, normalised path without `..` or root components (`None` if it escapes).
pub(crate) fn clean_rel(p: &Path) -> Option<String> {
    let mut out: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out.join("/"))
}
