//! Unit tests of duplicate detection, backoff jitter and IO cause names.

use super::storm::Rng;
use super::*;

#[test]
fn dedup_by_set_and_by_order() {
    let mut s = Dedup::Set(HashSet::new());
    assert!(s.insert(5) && s.insert(1) && !s.insert(5));
    let mut o = Dedup::Ordered(None);
    assert!(o.insert(0) && o.insert(1) && !o.insert(1) && !o.insert(0) && o.insert(7));
}

#[test]
fn jitter_stays_below_its_ceiling() {
    let mut r = Rng(42);
    for n in [1, 2, 100, 5000] {
        for _ in 0..1000 {
            assert!(r.below(n) < n);
        }
    }
    assert_eq!(r.below(0), 0);
}

#[test]
fn io_causes_are_named() {
    let e = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    assert_eq!(io_cause("tcp", &e), "tcp_refused");
    let e = std::io::Error::from_raw_os_error(libc::EMFILE);
    assert_eq!(io_cause("socket", &e), "socket_too_many_open_files");
}
