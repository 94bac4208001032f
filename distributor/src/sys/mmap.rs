//! Owned memory mappings: [`Mmap`] (its length known, unmapped on drop) with bounds- and alignment-checked access to the memory it holds.
//!
//! A mapping of a socket's rings is memory the kernel reads and writes
//! while we do, so the safe accessors never hand out a plain reference to
//! it: atomic words are [`AtomicU32`] (made for concurrent change), plain
//! values are copied in and out through raw pointers after a bounds check.
//! The one accessor that lends a byte slice, [`Mmap::slice`], is `unsafe`:
//! only the owner of the ring protocol (in `sys`) knows when the kernel
//! leaves a range alone, and establishes it once per frame.
//!
//! Mappings of a descriptor are made only inside `sys` (by the ring
//! owners); anywhere else can only make anonymous ones.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// Plain data: any bit pattern is a valid value, no pointers, no padding
/// that matters — what may be copied to and from memory the kernel shares.
///
/// # Safety
/// An implementing type must be `Copy`, valid for every bit pattern of its
/// size and hold no references or pointers.
pub unsafe trait Pod: Copy {}

// SAFETY: integers are valid for every bit pattern.
unsafe impl Pod for u8 {}
// SAFETY: as above.
unsafe impl Pod for u16 {}
// SAFETY: as above.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for u64 {}
// SAFETY: as above.
unsafe impl Pod for i64 {}
// SAFETY: `struct xdp_desc`: a u64 and two u32, no padding, every pattern valid.
unsafe impl Pod for libc::xdp_desc {}

/// Extra flags of a shared mapping (never `MAP_FIXED`: the kernel picks
/// the address, so a mapping never replaces memory already in use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Extra {
    /// `MAP_SHARED` only.
    None,
    /// `MAP_LOCKED`: pages locked in memory (needs `RLIMIT_MEMLOCK` room).
    Locked,
    /// `MAP_POPULATE`: pages faulted in at once.
    Populate,
}

/// A memory mapping owned by this value: `len` bytes at `ptr`, unmapped
/// when dropped.
#[derive(Debug)]
pub struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone (no pointer to it
// escapes but through borrows of the value), so moving it to another
// thread moves the only access to it; it is not `Sync` — the plain
// accessors assume one thread at a time.
unsafe impl Send for Mmap {}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, unmapped once;
        // no borrow of the memory outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

impl Mmap {
    fn checked(
        len: usize,
        prot_flags: libc::c_int,
        fd: libc::c_int,
        offset: libc::off_t,
    ) -> io::Result<Mmap> {
        Mmap::checked_prot(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            prot_flags,
            fd,
            offset,
        )
    }

    fn checked_prot(
        len: usize,
        prot: libc::c_int,
        prot_flags: libc::c_int,
        fd: libc::c_int,
        offset: libc::off_t,
    ) -> io::Result<Mmap> {
        // SAFETY: a new mapping at an address the kernel picks (no
        // MAP_FIXED), so no memory in use is replaced; the result is checked.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, prot_flags, fd, offset) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        match NonNull::new(p.cast::<u8>()) {
            Some(ptr) => Ok(Mmap { ptr, len }),
            None => Err(io::Error::other("mmap returned address 0")),
        }
    }

    /// `len` bytes of `fd` from byte `offset`, shared with the kernel
    /// (read and write).
    pub(super) fn shared(
        fd: BorrowedFd<'_>,
        len: usize,
        offset: u64,
        extra: Extra,
    ) -> io::Result<Mmap> {
        let flags = libc::MAP_SHARED
            | match extra {
                Extra::None => 0,
                Extra::Locked => libc::MAP_LOCKED,
                Extra::Populate => libc::MAP_POPULATE,
            };
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap offset too large"))?;
        Mmap::checked(len, flags, fd.as_raw_fd(), offset)
    }

    /// `len` bytes of `fd` from byte `offset`, shared with the kernel, read
    /// only (pages the kernel refuses to map writable: a BPF ring buffer's
    /// producer side). Writing through it would fault: the writers
    /// ([`Mmap::write`], [`Mmap::copy_in`]) must not be used on it, which
    /// its owner (in `sys`) guarantees by never calling them.
    pub(super) fn shared_read_only(
        fd: BorrowedFd<'_>,
        len: usize,
        offset: u64,
    ) -> io::Result<Mmap> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap offset too large"))?;
        Mmap::checked_prot(
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset,
        )
    }

    /// `len` bytes of private anonymous memory, zeroed and faulted in.
    pub fn anonymous(len: usize) -> io::Result<Mmap> {
        Mmap::checked(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (a mapping has at least a byte); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of the first byte (for registering the memory with the
    /// kernel, inside `sys`).
    pub(super) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// True if `size` bytes at `off` lie inside the mapping.
    #[inline(always)]
    pub fn contains(&self, off: usize, size: usize) -> bool {
        off.checked_add(size).is_some_and(|end| end <= self.len)
    }

    /// The 4-byte word at `off` as an atomic (the kernel accesses ring
    /// indexes and statuses atomically too); `None` out of bounds or
    /// misaligned.
    #[inline(always)]
    pub fn atomic_u32(&self, off: usize) -> Option<&AtomicU32> {
        if !self.contains(off, 4) || (self.addr() as usize + off) % 4 != 0 {
            return None;
        }
        // SAFETY: in bounds and 4-byte aligned (checked).
        Some(unsafe { self.atomic_u32_unchecked(off) })
    }

    /// The 8-byte word at `off` as an atomic; `None` out of bounds or
    /// misaligned.
    #[inline(always)]
    pub fn atomic_u64(&self, off: usize) -> Option<&AtomicU64> {
        if !self.contains(off, 8) || (self.addr() as usize + off) % 8 != 0 {
            return None;
        }
        // SAFETY: in bounds and 8-byte aligned (checked) of the live
        // mapping; an AtomicU64 may be changed by others (the kernel) while
        // borrowed.
        Some(unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU64>() })
    }

    /// Copies the bytes at `off` into `dst`; false (nothing copied) if
    /// they do not lie in the mapping. For a range the ring's protocol says
    /// is quiescent (a record the kernel has committed).
    #[inline(always)]
    pub fn copy_out(&self, off: usize, dst: &mut [u8]) -> bool {
        if !self.contains(off, dst.len()) {
            return false;
        }
        // SAFETY: `dst.len()` bytes at `off` lie in the mapping (checked);
        // `dst` is a unique borrow, so it cannot overlap memory borrowed
        // through `&self`; a concurrent kernel write (a protocol breach)
        // changes bytes, never their validity (u8).
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len());
        }
        true
    }

    /// The 4-byte word at `off` as an atomic, unchecked.
    ///
    /// # Safety
    /// `off + 4 <= self.len()` and `self.addr() + off` is 4-byte aligned.
    #[inline(always)]
    pub unsafe fn atomic_u32_unchecked(&self, off: usize) -> &AtomicU32 {
        // SAFETY: the caller's promise puts the word inside the live mapping,
        // aligned; an AtomicU32 may be changed by others (the kernel)
        // while borrowed.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU32>() }
    }

    /// A copy of the `T` at `off` (any alignment); `None` out of bounds.
    /// For memory the ring's protocol says is quiescent (a descriptor the
    /// kernel has published, a slot this side owns); a word the kernel may
    /// change meanwhile is read with [`Mmap::atomic_u32`] instead.
    #[inline(always)]
    pub fn read<T: Pod>(&self, off: usize) -> Option<T> {
        if !self.contains(off, std::mem::size_of::<T>()) {
            return None;
        }
        // SAFETY: in bounds (checked); `T` is valid for any bytes.
        Some(unsafe { self.read_unchecked(off) })
    }

    /// A copy of the `T` at `off`, unchecked.
    ///
    /// # Safety
    /// `off + size_of::<T>() <= self.len()`.
    #[inline(always)]
    pub unsafe fn read_unchecked<T: Pod>(&self, off: usize) -> T {
        // SAFETY: in bounds (the caller's promise); unaligned reads allowed;
        // `T: Pod` is valid for whatever bytes are there.
        unsafe { std::ptr::read_unaligned(self.ptr.as_ptr().add(off).cast::<T>()) }
    }

    /// Writes `value` at `off` (any alignment); false (nothing written)
    /// out of bounds.
    #[inline(always)]
    pub fn write<T: Pod>(&mut self, off: usize, value: T) -> bool {
        if !self.contains(off, std::mem::size_of::<T>()) {
            return false;
        }
        // SAFETY: in bounds (checked).
        unsafe { self.write_unchecked(off, value) };
        true
    }

    /// Writes `value` at `off`, unchecked.
    ///
    /// # Safety
    /// `off + size_of::<T>() <= self.len()`.
    #[inline(always)]
    pub unsafe fn write_unchecked<T: Pod>(&mut self, off: usize, value: T) {
        // SAFETY: in bounds (the caller's promise); `&mut self`: no slice
        // of this mapping is lent out.
        unsafe { std::ptr::write_unaligned(self.ptr.as_ptr().add(off).cast::<T>(), value) }
    }

    /// Copies `src` to `off`; false (nothing copied) if it does not fit.
    #[inline(always)]
    pub fn copy_in(&mut self, off: usize, src: &[u8]) -> bool {
        if !self.contains(off, src.len()) {
            return false;
        }
        // SAFETY: `src.len()` bytes at `off` lie in the mapping (checked),
        // which `src` (a borrow of other memory, or of this mapping only
        // through `&self`, impossible with `&mut self`) does not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len());
        }
        true
    }

    /// The `len` bytes at `off` as a slice; `None` out of bounds.
    ///
    /// # Safety
    /// Nothing — the kernel included — may write those bytes while the
    /// slice lives (the ring protocol must give them to us for that time).
    #[inline(always)]
    pub unsafe fn slice(&self, off: usize, len: usize) -> Option<&[u8]> {
        if !self.contains(off, len) {
            return None;
        }
        // SAFETY: in bounds (checked) of the live mapping; unchanged while
        // borrowed (the caller's promise; writes through `self` need `&mut`).
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) })
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn accessors_check_bounds_and_alignment() -> io::Result<()> {
        let mut m = Mmap::anonymous(4096)?;
        assert_eq!(m.len(), 4096);
        assert!(m.atomic_u32(4092).is_some());
        assert!(m.atomic_u32(4093).is_none(), "misaligned");
        assert!(m.atomic_u32(4096).is_none(), "past the end");
        assert!(m.atomic_u32(usize::MAX - 1).is_none(), "overflow");
        assert!(m.write(4088, 7u64));
        assert!(!m.write(4089, 7u64));
        assert_eq!(m.read::<u64>(4088), Some(7));
        assert_eq!(m.read::<u64>(4089), None);
        assert!(m.copy_in(10, b"abc"));
        assert!(!m.copy_in(4094, b"abc"));
        assert_eq!(m.read::<u8>(11), Some(b'b'));
        if let Some(w) = m.atomic_u32(16) {
            w.store(5, Ordering::Relaxed);
        }
        assert_eq!(m.read::<u32>(16), Some(5));
        // SAFETY: nothing else writes this private mapping.
        assert_eq!(unsafe { m.slice(10, 3) }, Some(&b"abc"[..]));
        // SAFETY: as above.
        assert_eq!(unsafe { m.slice(4095, 2) }, None);
        Ok(())
    }
}
