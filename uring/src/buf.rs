//! Buffers an operation owns while the kernel or the device uses them.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Memory an I/O operation can own while it is in flight: host memory, or anything the caller
/// adapts (a p2pmem mapping from another crate, a slice of a registered arena, ...).
///
/// The ring takes the buffer by value when an operation is queued and gives it back with the
/// completion, so nothing else can touch it while the device does.
///
/// # Safety
///
/// Implementors guarantee that, for as long as the value lives and is not accessed through
/// other means: `as_mut_ptr()..as_mut_ptr() + len()` is valid memory that the kernel and a DMA
/// device may read and write; the address and length do not change when the value is moved
/// (the memory is not inline in the value); and `as_ptr() == as_mut_ptr()`.
pub unsafe trait IoBuf {
    /// Start of the memory.
    fn as_ptr(&self) -> *const u8;
    /// Start of the memory, for the device to write.
    fn as_mut_ptr(&mut self) -> *mut u8;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether the buffer is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// SAFETY: a Vec's heap memory does not move when the Vec is moved and is valid for len bytes.
unsafe impl IoBuf for Vec<u8> {
    fn as_ptr(&self) -> *const u8 {
        self.as_slice().as_ptr()
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_slice().as_mut_ptr()
    }
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

// SAFETY: as for Vec: boxed memory does not move with the box.
unsafe impl IoBuf for Box<[u8]> {
    fn as_ptr(&self) -> *const u8 {
        <[u8]>::as_ptr(self)
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        <[u8]>::as_mut_ptr(self)
    }
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}

// SAFETY: forwards to the inner buffer, whose memory does not move with the box.
unsafe impl<T: IoBuf + ?Sized> IoBuf for Box<T> {
    fn as_ptr(&self) -> *const u8 {
        (**self).as_ptr()
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        (**self).as_mut_ptr()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

/// Zeroed host memory with a chosen alignment (default 4096: satisfies O_DIRECT and NVMe PRP
/// rules, so no bounce copies).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed bytes aligned to 4096.
    ///
    /// # Panics
    ///
    /// On allocation failure (like `Vec`).
    pub fn new(len: usize) -> Self {
        Self::with_align(len, 4096)
    }
    /// `len` zeroed bytes aligned to `align` (a power of two).
    ///
    /// # Panics
    ///
    /// When `align` is not a power of two, or on allocation failure.
    pub fn with_align(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), align).expect("power-of-two alignment");
        // SAFETY: layout has a non-zero size.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            layout: Layout::from_size_align(len, align).expect("checked above"),
        }
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives unique access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
    /// The alignment it was allocated with.
    pub fn align(&self) -> usize {
        self.layout.align()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.layout.size().max(1), self.layout.align())
            .expect("valid at allocation");
        // SAFETY: allocated with this layout in with_align.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("addr", &self.ptr)
            .field("len", &self.layout.size())
            .field("align", &self.layout.align())
            .finish()
    }
}

// SAFETY: heap memory owned by the value, valid for len bytes, never moves.
unsafe impl IoBuf for AlignedBuf {
    fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
}

/// Memory that the caller manages, named by address and length. Use it for buffers that no
/// Rust value the ring could hold owns: a slot of a registered pool, a device mapping that
/// outlives the ring, and the like.
///
/// Unlike the owned buffers, it does not keep the memory alive. [`RawBuf::new`] is `unsafe`
/// because the caller promises that instead.
#[derive(Debug)]
pub struct RawBuf {
    ptr: *mut u8,
    len: usize,
}

impl RawBuf {
    /// A view of `ptr..ptr + len`.
    ///
    /// # Safety
    ///
    /// Until the operation that takes this buffer has completed (its completion has been
    /// reaped or the ring dropped), `ptr..ptr + len` stays valid memory that the kernel and a
    /// DMA device may read and write, and nothing else writes it (or reads it, for a read
    /// into it).
    pub unsafe fn new(ptr: *mut u8, len: usize) -> RawBuf {
        RawBuf { ptr, len }
    }
}

// SAFETY: RawBuf::new's contract is IoBuf's; the address lives outside the value.
unsafe impl IoBuf for RawBuf {
    fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// A sub-range of an owned buffer, so one big buffer can be used piecewise (take it back with
/// [`Slice::into_inner`]).
#[derive(Debug)]
pub struct Slice<B> {
    inner: B,
    start: usize,
    len: usize,
}

impl<B: IoBuf> Slice<B> {
    /// `inner[start..start + len]`.
    ///
    /// # Panics
    ///
    /// When the range is outside `inner`.
    pub fn new(inner: B, start: usize, len: usize) -> Self {
        assert!(
            start.checked_add(len).is_some_and(|e| e <= inner.len()),
            "slice {start}+{len} outside a buffer of {} bytes",
            inner.len()
        );
        Slice { inner, start, len }
    }
    /// The whole buffer back.
    pub fn into_inner(self) -> B {
        self.inner
    }
    /// Offset of the slice in the buffer.
    pub fn start(&self) -> usize {
        self.start
    }
}

// SAFETY: a checked sub-range of a valid IoBuf is valid and moves with it only as the inner
// buffer does (i.e. not at all).
unsafe impl<B: IoBuf> IoBuf for Slice<B> {
    fn as_ptr(&self) -> *const u8 {
        // SAFETY: start <= inner.len() (checked in new).
        unsafe { self.inner.as_ptr().add(self.start) }
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: as above.
        unsafe { self.inner.as_mut_ptr().add(self.start) }
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// The buffers an operation owns, in the one shape every operation uses: they travel with the
/// operation from submission to its [`Completion`](crate::Completion), or come back at once
/// in a [`Rejected`](crate::Rejected).
#[derive(Debug, Default)]
pub enum Buffers<B> {
    /// An operation without data (flush, poll, a raw command without a buffer).
    #[default]
    None,
    /// The buffer of a single-buffer operation (read, write, a raw command).
    One(B),
    /// The buffers of a vectored operation, in order.
    Many(Vec<B>),
}

impl<B> Buffers<B> {
    /// The buffers in order (empty, one, or all of a vector).
    pub fn as_slice(&self) -> &[B] {
        match self {
            Buffers::None => &[],
            Buffers::One(b) => std::slice::from_ref(b),
            Buffers::Many(v) => v,
        }
    }
    /// How many buffers there are.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }
    /// Whether there is no buffer.
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
    /// The buffers in order.
    pub fn iter(&self) -> std::slice::Iter<'_, B> {
        self.as_slice().iter()
    }
    /// The buffer, when there is exactly one.
    pub fn single(&self) -> Option<&B> {
        match self.as_slice() {
            [b] => Some(b),
            _ => None,
        }
    }
    /// Takes the buffer, when there is exactly one (`None` otherwise, dropping the rest).
    pub fn into_single(self) -> Option<B> {
        match self {
            Buffers::One(b) => Some(b),
            Buffers::Many(mut v) if v.len() == 1 => v.pop(),
            _ => None,
        }
    }
    /// Takes every buffer, in order.
    pub fn into_vec(self) -> Vec<B> {
        match self {
            Buffers::None => Vec::new(),
            Buffers::One(b) => vec![b],
            Buffers::Many(v) => v,
        }
    }
}

impl<B> From<Option<B>> for Buffers<B> {
    fn from(b: Option<B>) -> Self {
        b.map_or(Buffers::None, Buffers::One)
    }
}

impl<'a, B> IntoIterator for &'a Buffers<B> {
    type Item = &'a B;
    type IntoIter = std::slice::Iter<'a, B>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::Buffers;

    #[test]
    fn buffers_shapes() {
        let none: Buffers<u8> = Buffers::None;
        assert!(none.is_empty());
        assert_eq!(none.single(), None);
        assert_eq!(none.into_single(), None);

        let one = Buffers::One(7u8);
        assert_eq!(one.len(), 1);
        assert_eq!(one.single(), Some(&7));
        assert_eq!(one.into_vec(), vec![7]);

        let many = Buffers::Many(vec![1u8, 2, 3]);
        assert_eq!(many.len(), 3);
        assert_eq!(many.iter().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(many.single(), None);
        assert_eq!(many.into_single(), None, "three buffers are not one");
        assert_eq!(Buffers::Many(vec![9u8]).into_single(), Some(9));
        assert_eq!(Buffers::Many(Vec::<u8>::new()).len(), 0);

        assert!(matches!(Buffers::from(Some(4u8)), Buffers::One(4)));
        assert!(matches!(Buffers::<u8>::from(None), Buffers::None));
        // No `B: Default` bound: buffers that have no default still have empty `Buffers`.
        assert!(Buffers::<super::RawBuf>::default().is_empty());
    }
}
