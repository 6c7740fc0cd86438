//! Who holds the store: a pid file beside the store file, and the lookup that names the
//! process holding a store this process could not lock.
//!
//! redb locks its file (so two processes never write one store) but cannot say who holds
//! the lock, and its locks are open-file-description locks that `/proc/locks` lists
//! without a PID. So the gateway writes `gateway.pid` beside the store once it holds the
//! lock, and removes it when it lets go. When a lock is refused, [`holder`] names the
//! process: the pid file's PID if that process has the store file open, else any process
//! whose open files include it (found through `/proc/*/fd`), else the pid file's PID if
//! that process still runs (its fds may be unreadable to us).

use std::path::{Path, PathBuf};

/// The pid file beside the store file `file`.
pub(crate) fn pid_file_of(file: &Path) -> PathBuf {
    file.with_file_name("gateway.pid")
}

/// The crash marker beside the store file `file`: written when a pid file was found
/// left behind (the last holder crashed), removed by whoever handled what the crash left
/// (the fleet's wills, `cluster::session_leftover`), so that a start that fails, a
/// `store-repair` or a start without the fleet in between does not forget the crash.
pub(crate) fn crash_marker_of(file: &Path) -> PathBuf {
    file.with_file_name("gateway.crashed")
}

/// This process's PID in the pid file beside `file`; removed on drop.
pub(crate) struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes the pid file (best effort: a failure only costs the PID in a later message).
    /// Called once the store's lock is held, so a pid file already there was left by a
    /// holder that never let go (a crash, `kill -9`): the crash marker is written.
    pub(crate) fn write(file: &Path) -> PidFile {
        let path = pid_file_of(file);
        if path.exists() {
            let marker = crash_marker_of(file);
            if let Err(e) = std::fs::write(&marker, b"") {
                tracing::warn!(path = %marker.display(), error = %e, "cannot write the crash marker");
            }
        }
        if let Err(e) = std::fs::write(&path, format!("{}\n", std::process::id())) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the store pid file");
        }
        PidFile { path }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only our own: a later holder may have rewritten it.
        if read_pid(&self.path) == Some(std::process::id()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether process `pid` has `file` open: `Some(false)` if its fds say no, `None` if they
/// cannot be read.
fn has_open(pid: u32, file: &Path) -> Option<bool> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        fds.filter_map(Result::ok)
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .any(|target| target == file),
    )
}

/// Another process that has `file` open, found by reading `/proc/*/fd`.
fn scan(file: &Path) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .find(|&pid| has_open(pid, file) == Some(true))
}

/// The PID of the process that most likely holds the lock on the store file `file`.
pub(crate) fn holder(file: &Path) -> Option<u32> {
    let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let recorded = read_pid(&pid_file_of(&file)).filter(|&p| p != std::process::id());
    if let Some(pid) = recorded {
        if has_open(pid, &file) == Some(true) {
            return Some(pid);
        }
    }
    scan(&file).or_else(|| {
        recorded
            .filter(|&p| has_open(p, &file).is_none() && Path::new(&format!("/proc/{p}")).exists())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_file_names_this_process_and_goes_with_it() {
        let dir = std::env::temp_dir().join(format!("gateway-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("gateway.redb");
        let pid = PidFile::write(&file);
        assert_eq!(read_pid(&pid_file_of(&file)), Some(std::process::id()));
        drop(pid);
        assert!(!pid_file_of(&file).exists());
        // A holder that never let go (a crash: no drop) is seen by the next one.
        assert!(!crash_marker_of(&file).exists(), "the last holder let go");
        std::mem::forget(PidFile::write(&file));
        drop(PidFile::write(&file));
        assert!(
            crash_marker_of(&file).exists(),
            "the last holder never let go"
        );
        drop(PidFile::write(&file));
        assert!(
            crash_marker_of(&file).exists(),
            "kept until what it left is handled"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
