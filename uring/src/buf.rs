//! Buffers an operation owns while the kernel or the device uses them. The owned host buffer
//! ([`AlignedBuf`]) and the pool buffer (`peerpipe_p2p_alloc::Buffer`) come from the
//! allocator crate, where memory lives; this module makes them (and the caller's own types)
//! [`IoBuf`]s.

pub use peerpipe_p2p_alloc::AlignedBuf;
use peerpipe_p2p_alloc::Buffer as PoolBuffer;

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

// SAFETY: heap memory owned by the value, valid for len bytes, never moves (AlignedBuf's
// documented contract); both pointers are the same address.
unsafe impl IoBuf for AlignedBuf {
    fn as_ptr(&self) -> *const u8 {
        self.as_slice().as_ptr()
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_slice().as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.as_slice().len()
    }
}

// SAFETY: a pool buffer's memory lies in a chunk mapping that stays mapped while the handle
// lives and is handed to this handle only; it does not move with the handle; both pointers
// are its address.
unsafe impl IoBuf for PoolBuffer {
    fn as_ptr(&self) -> *const u8 {
        self.addr()
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.addr()
    }
    fn len(&self) -> usize {
        PoolBuffer::len(self)
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
