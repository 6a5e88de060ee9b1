//! A bpffs of a test's own, mounted on a temporary directory: `ip netns exec`
//! gives the processes it starts a fresh sysfs without the host's
//! `/sys/fs/bpf` (other mounts it keeps), and a test must not leave pins in
//! the host's. Unmounted when dropped, which detaches whatever programs are
//! still pinned in it.

use std::{path::Path, process::Command};

/// A mounted bpffs.
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    /// Mounts a new bpffs instance.
    pub fn mount() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(status.success(), "mount -t bpf: {status}");
        Self { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
