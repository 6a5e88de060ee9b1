//! Finding the cgroup v2 directory the `flow_state` sock_ops program is
//! attached to: the one this process belongs to, so it sees the proxy's sockets
//! and no one else's outside it.

use std::{fs, io, path::Path, path::PathBuf};

use anyhow::Context as _;

/// Opens the cgroup v2 directory this process belongs to.
///
/// `ip netns exec` and some containers give the process a mount namespace without
/// the cgroup2 hierarchy; then it is mounted on a private temporary directory just
/// long enough to open the directory (the attachment outlives the mount).
pub fn open_own_cgroup_v2() -> anyhow::Result<(fs::File, PathBuf)> {
    let membership =
        fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let relative = membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .context("process is in no cgroup v2 group")?
        .trim_start_matches('/')
        .to_owned();
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    if let Some(mount_point) = cgroup2_mount_point(&mountinfo) {
        let path = PathBuf::from(mount_point).join(&relative);
        let dir =
            fs::File::open(&path).with_context(|| format!("opening cgroup {}", path.display()))?;
        return Ok((dir, path));
    }
    let temp = std::env::temp_dir().join(format!("spliced-cgroup2-{}", std::process::id()));
    fs::create_dir_all(&temp).with_context(|| format!("creating {}", temp.display()))?;
    let result = with_temporary_cgroup2_mount(&temp, |root| {
        let path = root.join(&relative);
        fs::File::open(&path).with_context(|| format!("opening cgroup {}", path.display()))
    });
    let _ = fs::remove_dir(&temp);
    Ok((result?, PathBuf::from("cgroup2:/").join(relative)))
}

/// Where `/proc/self/mountinfo` says a cgroup2 hierarchy is mounted.
fn cgroup2_mount_point(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        (after.split_whitespace().next() == Some("cgroup2"))
            .then(|| before.split_whitespace().nth(4).map(str::to_owned))?
    })
}

fn with_temporary_cgroup2_mount<T>(
    dir: &Path,
    f: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    use std::os::unix::ffi::OsStrExt as _;
    let target = std::ffi::CString::new(dir.as_os_str().as_bytes()).context("temporary path")?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .context("no cgroup v2 hierarchy is mounted and mounting one failed");
    }
    let result = f(dir);
    // SAFETY: as above; MNT_DETACH so an open directory fd does not block it.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_point() {
        let mountinfo = "\
24 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            cgroup2_mount_point(mountinfo).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        assert_eq!(
            cgroup2_mount_point("24 30 0:22 / /sys rw - sysfs sysfs rw"),
            None
        );
    }
}
