//! Measuring what a piece of code allocates: the process's global allocator is the system
//! one behind a meter that, on a thread inside [`measure`], keeps the bytes live and their
//! peak. Other threads, and a thread outside `measure`, pay one thread-local read per call.
//!
//! Harnesses use it to check that hostile input cannot make a reader allocate far more than
//! the input is long (libFuzzer's `-malloc_limit_mb` only catches single huge requests, not
//! a million moderate ones).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

#[global_allocator]
static METER: Meter = Meter;

struct Meter;

/// What the code inside [`measure`] allocated on its thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// The most bytes live at once, beyond those live when `measure` began.
    pub peak: usize,
    /// The largest single request, in bytes.
    pub largest: usize,
}

#[derive(Clone, Copy)]
struct Counts {
    live: isize,
    peak: isize,
    largest: usize,
}

thread_local! {
    // `const`, `Copy` and without `Drop`: reading it never allocates, so the allocator can.
    static COUNTS: Cell<Option<Counts>> = const { Cell::new(None) };
}

fn note(grown: isize, request: usize) {
    // `try_with`: a thread being torn down frees memory after its thread-locals are gone.
    let _ = COUNTS.try_with(|counts| {
        if let Some(mut c) = counts.get() {
            c.live += grown;
            c.peak = c.peak.max(c.live);
            c.largest = c.largest.max(request);
            counts.set(Some(c));
        }
    });
}

// SAFETY: every call goes to `System` unchanged; the meter only counts what it did.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            note(layout.size() as isize, layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            note(layout.size() as isize, layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize), 0);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // Counted as the new block joining before the old one leaves, as a moving
            // realloc does.
            note(new_size as isize, new_size);
            note(-(layout.size() as isize), 0);
        }
        new
    }
}

/// Runs `f` and reports what it allocated on this thread. Not reentrant: a `measure`
/// inside `f` ends the outer one's counting.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    COUNTS.with(|c| {
        c.set(Some(Counts {
            live: 0,
            peak: 0,
            largest: 0,
        }))
    });
    let result = f();
    let counts = COUNTS.with(|c| c.take()).unwrap_or(Counts {
        live: 0,
        peak: 0,
        largest: 0,
    });
    let usage = Usage {
        peak: counts.peak.max(0) as usize,
        largest: counts.largest,
    };
    (result, usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_runs_inside() {
        let (v, usage) = measure(|| {
            let a = vec![1u8; 10_000];
            let b = vec![2u8; 5_000];
            drop(a);
            let c = vec![3u8; 3_000];
            b.len() + c.len()
        });
        assert_eq!(v, 8_000);
        assert!(usage.peak >= 15_000 && usage.peak < 16_000, "{usage:?}");
        assert_eq!(usage.largest, 10_000);
        let (_, idle) = measure(|| ());
        assert_eq!(idle, Usage::default());
    }
}
