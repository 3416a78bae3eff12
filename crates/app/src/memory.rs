//! Gives the memory of start-up code back to the kernel. Starting a server touches code that an
//! idle server never runs again (certificate generation, bootstrap objects, every controller's
//! initial list and sync); the kernel maps it in 64 KiB "fault-around" batches, so several MiB of
//! skiff's own executable stay resident for nothing. Once the server has settled, the read-only
//! mappings of the executable are advised `MADV_PAGEOUT`: the kernel reclaims those clean pages,
//! and the ones the running server still uses fault back in from the page cache or the file.
//! Only mappings with no private (copy-on-write) pages are advised, so relocated data is never
//! touched. Anonymous memory (the heap) is not affected.

use std::os::unix::fs::MetadataExt;

/// A mapping of `/proc/self/smaps`.
#[derive(Debug, PartialEq)]
struct Mapping {
    start: usize,
    end: usize,
    perms: String,
    inode: u64,
    anonymous_kib: u64,
}

/// Parses `/proc/<pid>/smaps` text into mappings.
fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let Some(first) = parts.next() else { continue };
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            let perms = parts.next().unwrap_or("").to_string();
            let _offset = parts.next();
            let _dev = parts.next();
            let inode = parts.next().and_then(|i| i.parse().ok()).unwrap_or(0);
            out.push(Mapping {
                start,
                end,
                perms,
                inode,
                anonymous_kib: 0,
            });
        } else if first == "Anonymous:"
            && let Some(m) = out.last_mut()
        {
            m.anonymous_kib = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        }
    }
    out
}

/// The mappings of the executable (inode `exe_inode`) that may be paged out: not writable and
/// without private copies.
fn releasable(maps: &[Mapping], exe_inode: u64) -> Vec<(usize, usize)> {
    maps.iter()
        .filter(|m| {
            m.inode == exe_inode
                && exe_inode != 0
                && m.perms.starts_with('r')
                && !m.perms.contains('w')
                && m.anonymous_kib == 0
        })
        .map(|m| (m.start, m.end))
        .collect()
}

/// Pages out the read-only mappings of the running executable; returns how many bytes were
/// advised. Errors are only reported (the server works the same without this).
pub fn release_startup_pages() -> std::io::Result<usize> {
    let exe_inode = std::fs::metadata("/proc/self/exe")?.ino();
    let maps = parse_smaps(&std::fs::read_to_string("/proc/self/smaps")?);
    let mut advised = 0;
    for (start, end) in releasable(&maps, exe_inode) {
        // SAFETY: the range is a whole mapping of this process's executable that is read-only
        // and has no private pages; MADV_PAGEOUT only drops clean file-backed pages from this
        // process's page tables (and the page cache), which the kernel reads back from the file
        // on the next access. It never changes what the memory contains.
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        advised += end - start;
    }
    Ok(advised)
}

/// Spawns the release of start-up pages 10 s from now (long enough for the controllers' and the
/// kubelet's initial lists and syncs); failures are only logged.
pub(crate) fn release_startup_pages_later() {
    tokio::spawn(async {
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        match tokio::task::spawn_blocking(release_startup_pages).await {
            Ok(Ok(bytes)) => tracing::debug!(bytes, "start-up code pages released"),
            Ok(Err(e)) => tracing::debug!(error = %e, "releasing start-up code pages failed"),
            Err(_) => {}
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55f4f6951000-55f4f7509000 r--p 00000000 fd:01 1234 /usr/bin/skiff
Size:              12000 kB
Anonymous:             0 kB
55f4f7509000-55f4f9a7d000 r-xp 00bb8000 fd:01 1234 /usr/bin/skiff
Anonymous:             0 kB
55f4f9a7d000-55f4f9cae000 r--p 03128000 fd:01 1234 /usr/bin/skiff
Anonymous:          2224 kB
55f4f9cae000-55f4f9cb0000 rw-p 03358000 fd:01 1234 /usr/bin/skiff
Anonymous:             8 kB
7f966a9dc000-7f966ab32000 r-xp 00028000 fd:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
";

    #[test]
    fn only_clean_read_only_mappings_of_the_executable_are_released() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 5);
        assert_eq!(maps[2].anonymous_kib, 2224);
        assert_eq!(
            releasable(&maps, 1234),
            vec![
                (0x55f4f6951000, 0x55f4f7509000),
                (0x55f4f7509000, 0x55f4f9a7d000)
            ]
        );
        assert!(releasable(&maps, 0).is_empty());
    }

    #[test]
    fn releasing_keeps_the_process_working() {
        let n = release_startup_pages().expect("madvise");
        assert!(n > 0, "the test binary has read-only mappings");
        // Code and constants still work after their pages were dropped.
        let v: Vec<u64> = (0..1000).map(|i| i * 3).collect();
        assert_eq!(v.iter().sum::<u64>(), 1_498_500);
        assert_eq!(format!("{:?}", SMAPS.len()), SMAPS.len().to_string());
    }
}
