//! One 16-byte address layout for both families.

/// An address as four 32-bit words in network byte order (the bytes of the
/// packet, read as native words). IPv4 is IPv4-mapped: `::ffff:a.b.c.d`.
pub type RawAddr = [u32; 4];

/// The third word of an IPv4-mapped address (`00 00 ff ff` in memory order).
pub const V4_MAPPED_MARKER: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Maps an IPv4 address word (as read from the packet) into a `RawAddr`.
#[inline(always)]
pub const fn from_v4_word(word: u32) -> RawAddr {
    [0, 0, V4_MAPPED_MARKER, word]
}

/// The IPv4 address word of an IPv4-mapped `RawAddr`, or `None` for IPv6.
#[inline(always)]
pub const fn v4_word(addr: &RawAddr) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_MARKER {
        Some(addr[3])
    } else {
        None
    }
}

/// Builds a `RawAddr` from the 16 bytes of an IPv6 address.
pub const fn from_v6_octets(o: [u8; 16]) -> RawAddr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The 16 bytes (network order) of a `RawAddr`.
pub const fn octets(addr: &RawAddr) -> [u8; 16] {
    let a = addr[0].to_ne_bytes();
    let b = addr[1].to_ne_bytes();
    let c = addr[2].to_ne_bytes();
    let d = addr[3].to_ne_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}
