//! Where a SQLite store may live. Several gateway processes may share one SQLite file (the
//! audit chain, refresh leases and migrations are serialised through the database and a lock
//! file), but only on one host: SQLite's write-ahead log keeps its index in shared memory,
//! which a network filesystem does not share between hosts, and such filesystems' locks are
//! not reliable enough for SQLite. A store on one is refused at start: replicas on several
//! hosts need PostgreSQL.

use std::path::Path;

/// Filesystems (Linux `statfs` magic numbers) a SQLite store must not live on.
const NETWORK_FILESYSTEMS: &[(i64, &str)] = &[
    (0x6969, "NFS"),
    (0x517B, "SMB"),
    (0xFF53_4D42, "CIFS"),
    (0xFE53_4D42, "SMB2"),
    (0x00C3_6400, "Ceph"),
    (0x0102_1997, "9P"),
];

/// The network filesystem named by a `statfs` magic number, if it is one.
pub fn network_filesystem(magic: i64) -> Option<&'static str> {
    NETWORK_FILESYSTEMS.iter().find(|(m, _)| *m == magic).map(|(_, name)| *name)
}

/// Refuses a SQLite database file whose directory `dir` is on a network filesystem.
pub fn check_sqlite_dir(dir: &Path) -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        if let Ok(fs) = nix::sys::statfs::statfs(dir) {
            #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
            let magic = i64::from(fs.filesystem_type().0 as i64);
            if let Some(name) = network_filesystem(magic) {
                return Err(format!(
                    "the SQLite store's directory {} is on a network filesystem ({name}); SQLite cannot be shared \
                     safely over it: keep the file on a local disk, or use PostgreSQL for replicas on several hosts",
                    dir.display()
                ));
            }
        }
    }
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_filesystems_are_named_and_local_ones_are_not() {
        assert_eq!(network_filesystem(0x6969), Some("NFS"));
        assert_eq!(network_filesystem(0xFF53_4D42), Some("CIFS"));
        assert_eq!(network_filesystem(0xEF53), None, "ext4");
        assert_eq!(network_filesystem(0x5846_5342), None, "XFS");
        assert_eq!(network_filesystem(0x0102_1994), None, "tmpfs");
        assert_eq!(network_filesystem(0x794C_7630), None, "overlayfs");
    }

    #[test]
    fn a_local_directory_is_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(check_sqlite_dir(dir.path()), Ok(()));
    }
}
