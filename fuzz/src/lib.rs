//! Shared parts of the fuzz targets.
//!
//! [`CappedAlloc`] is the global allocator of each target: it aborts the
//! process (which libFuzzer reports as a crash, saving the input) on any
//! single allocation above `LIMIT` bytes. That is how a length prefix that
//! makes a decoder reserve memory it was never sent is caught. libFuzzer's
//! own `-malloc_limit_mb` needs a sanitizer's malloc hooks, and the
//! sanitizers need a nightly compiler; this works on stable and is exact.
//! `-rss_limit_mb` still bounds the total.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;

pub struct CappedAlloc<const LIMIT: usize>;

impl<const LIMIT: usize> CappedAlloc<LIMIT> {
    fn check(size: usize) {
        if size > LIMIT {
            // No allocation from here on: a static message, then abort.
            let _ = std::io::stderr()
                .write_all(b"\n==fuzz== single allocation above the target's cap: a length prefix was trusted\n");
            std::process::abort();
        }
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// size check only adds an abort before it.
unsafe impl<const LIMIT: usize> GlobalAlloc for CappedAlloc<LIMIT> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::check(new_size);
        System.realloc(ptr, layout, new_size)
    }
}
