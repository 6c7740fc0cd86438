//! A panic inside redb becomes an error. redb trusts its file: on some damaged files it
//! indexes past the end of a page or unwraps a key's UTF-8 and panics instead of returning
//! an error (issue 17 item 9 saw the start exit 101 in 6 of 40 random corruptions). The
//! start and `store-repair` run redb's open and the load inside [`quietly`], which catches
//! the panic and keeps the panic hook from printing it, so the operator reads one clear
//! store error instead of a panic message.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Set while this thread runs inside [`quietly`].
    static QUIET: Cell<bool> = const { Cell::new(false) };
    /// What the last panic caught by [`quietly`] on this thread said, and where.
    static LAST: RefCell<String> = const { RefCell::new(String::new()) };
}

static HOOK: Once = Once::new();

/// Wraps the process's panic hook once: a panic on a thread inside [`quietly`] is
/// recorded for it instead of printed; every other panic goes to the previous hook.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if QUIET.get() {
                LAST.set(info.to_string());
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `f`; a panic inside it is returned as `Err` with its message and location.
/// State `f` touched may be half-changed after a panic: the caller must not use it.
pub(super) fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    let was = QUIET.replace(true);
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.set(was);
    result.map_err(|_| LAST.take())
}

#[cfg(test)]
mod tests {
    use super::quietly;

    #[test]
    fn a_panic_inside_becomes_its_message_and_outside_is_untouched() {
        assert_eq!(quietly(|| 7), Ok(7));
        let caught = quietly(|| -> u8 {
            let v: Vec<u8> = Vec::new();
            v[3]
        });
        let message = caught.expect_err("the panic is caught");
        assert!(message.contains("index out of bounds"), "{message}");
        assert!(message.contains("guard.rs"), "names where: {message}");
        // Nested: the inner catch leaves the outer one quiet.
        let outer = quietly(|| {
            let _ = quietly(|| panic!("inner"));
            panic!("outer")
        });
        assert!(outer.expect_err("outer caught").contains("outer"));
    }
}
