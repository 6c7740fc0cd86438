//! A scratch directory for a test, removed on drop.

/// A scratch directory removed on drop.
pub struct Dir(pub std::path::PathBuf);

/// Directories made by this process so far: two tests starting at once may read the
/// same clock value, and would then share (and overwrite, and remove) one directory —
/// one test's server certificate beside the other's key.
static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "gateway-test-{tag}-{}-{n}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        Dir(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
