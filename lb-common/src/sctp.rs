//! SCTP for the datapath: the common header, the first chunk's type as a
//! conntrack state, and the CRC32c change a port rewrite makes.
//!
//! SCTP's checksum is CRC32c (Castagnoli, reflected polynomial 0x82F63B78,
//! RFC 9260 appendix A) over the whole SCTP packet with the checksum field
//! zeroed, stored little-endian. Addresses are not covered (no
//! pseudo-header), so DNAT keeping the port needs no update. A CRC is affine
//! over GF(2): for messages of one length, `crc(a) ^ crc(b)` is the
//! zero-init, no-xorout CRC of `a ^ b`. A port rewrite changes only the first
//! four bytes, so the new CRC is the old one XOR that raw CRC of the four
//! changed bytes followed by `len - 4` zero bytes, which is the changed bytes
//! as a polynomial times x^(8·len) mod P: at most two GF(2)
//! multiplications, by x^(8·low byte of len) and x^(8·256·high byte) from
//! two 256-entry tables, whatever the packet's length. No packet data is
//! read, so it also works on non-linear skbs.

use crate::conntrack::ct_flags;

/// Common header: source port, destination port, verification tag, checksum.
pub const COMMON_HDR_LEN: usize = 12;
/// Offset of the CRC32c in the common header.
pub const CRC_OFF: usize = 8;
/// Common header plus a chunk header (type, flags, length).
pub const FIRST_CHUNK_HDR_END: usize = COMMON_HDR_LEN + 4;

/// Chunk types (RFC 9260 section 3.2) that move an association's state.
pub mod chunk {
    pub const INIT: u8 = 1;
    pub const INIT_ACK: u8 = 2;
    pub const ABORT: u8 = 6;
    pub const SHUTDOWN: u8 = 7;
    pub const SHUTDOWN_ACK: u8 = 8;
    pub const COOKIE_ECHO: u8 = 10;
    pub const SHUTDOWN_COMPLETE: u8 = 14;
}

/// The conntrack state bits (`ct_flags`, shared with TCP's flags) a packet
/// whose first chunk is `chunk_type` sets, like nf_conntrack's SCTP states:
/// the handshake (INIT, INIT ACK, COOKIE ECHO) as SYN, its end (ABORT, the
/// SHUTDOWN exchange) as FIN, anything else (DATA, SACK, COOKIE ACK,
/// HEARTBEAT...) as ACK, i.e. established.
#[inline(always)]
pub const fn ct_flags_of(chunk_type: u8) -> u8 {
    match chunk_type {
        chunk::INIT | chunk::INIT_ACK | chunk::COOKIE_ECHO => ct_flags::SYN,
        chunk::ABORT | chunk::SHUTDOWN | chunk::SHUTDOWN_ACK | chunk::SHUTDOWN_COMPLETE => ct_flags::FIN,
        _ => ct_flags::ACK,
    }
}

/// CRC32c's polynomial, bit-reflected (bit 31 is x^0).
const POLY: u32 = 0x82F6_3B78;
/// x^0 and x^8 in the reflected representation.
const X0: u32 = 1 << 31;
const X8: u32 = 1 << (31 - 8);

/// `a(x)·b(x) mod P(x)` in the reflected representation: 32 branchless
/// steps (the verifier sees straight-line code). In BPF a function of its
/// own, like `crc32c_ports_delta`: inlined, LLVM interleaves the steps and
/// spills to the stack, which the datapath's call chains cannot spare.
#[inline(never)]
const fn mul(a: u32, mut b: u32) -> u32 {
    let mut product = 0u32;
    let mut i = 0;
    while i < 32 {
        // Bit 31 - i of `a` is its coefficient of x^i.
        product ^= b & ((a >> (31 - i)) & 1).wrapping_neg();
        b = (b >> 1) ^ (POLY & (b & 1).wrapping_neg());
        i += 1;
    }
    product
}

/// `X8N_LOW[i]` = x^(8·i) mod P, `X8N_HIGH[j]` = x^(8·256·j) mod P: x^(8·n)
/// for any 16-bit `n` is one product of an entry of each.
static X8N_LOW: [u32; 256] = powers(X8);
static X8N_HIGH: [u32; 256] = powers(x8_256());

/// x^2048 = (x^8)^256.
const fn x8_256() -> u32 {
    let low = powers(X8);
    mul(low[255], X8)
}

/// `[1, step, step², …]`.
const fn powers(step: u32) -> [u32; 256] {
    let mut t = [0u32; 256];
    t[0] = X0;
    let mut i = 1;
    while i < 256 {
        t[i] = mul(t[i - 1], step);
        i += 1;
    }
    t
}

/// What to XOR into the CRC32c (as the little-endian value of the checksum
/// field) of an SCTP packet of `len` bytes (common header to the end of the
/// IP payload) when its source port changes by `sport_xor` and its
/// destination port by `dport_xor` (old XOR new, host order).
#[inline(never)]
pub fn crc32c_ports_delta(sport_xor: u16, dport_xor: u16, len: u16) -> u32 {
    let (s, d) = (sport_xor.to_be_bytes(), dport_xor.to_be_bytes());
    // The four changed bytes as the CRC register takes them (the first
    // byte in the low bits).
    let changed = u32::from_le_bytes([s[0], s[1], d[0], d[1]]);
    let low = mul(changed, X8N_LOW[(len & 0xff) as usize]);
    // Packets below 256 bytes (INIT, SACK, HEARTBEAT...) need one product.
    match len >> 8 {
        0 => low,
        high => mul(low, X8N_HIGH[high as usize]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    extern crate std;
    use std::vec::Vec;

    const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

    /// The checksum field's value of `pkt` (an SCTP packet), computed the
    /// standard way: over the packet with the field zeroed.
    fn crc_of(pkt: &[u8]) -> u32 {
        let mut p = pkt.to_vec();
        p[CRC_OFF..CRC_OFF + 4].fill(0);
        CASTAGNOLI.checksum(&p)
    }

    /// Deterministic bytes (xorshift).
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    #[test]
    fn the_incremental_update_matches_a_recomputed_crc32c() {
        // RFC 3720's test vector: 32 zero bytes.
        assert_eq!(CASTAGNOLI.checksum(&[0u8; 32]), 0x8A91_36AA);
        for (i, len) in [12usize, 13, 16, 32, 255, 256, 257, 1000, 1480, 4096, 9000, 65_535]
            .into_iter()
            .enumerate()
        {
            let old = bytes(i as u64 + 1, len);
            let mut new = old.clone();
            let (sport, dport) = (0x1234u16 ^ i as u16, 0xbeefu16.rotate_left(i as u32));
            new[0..2].copy_from_slice(&sport.to_be_bytes());
            new[2..4].copy_from_slice(&dport.to_be_bytes());
            let sx = u16::from_be_bytes([old[0], old[1]]) ^ sport;
            let dx = u16::from_be_bytes([old[2], old[3]]) ^ dport;
            let updated = crc_of(&old) ^ crc32c_ports_delta(sx, dx, len as u16);
            assert_eq!(updated, crc_of(&new), "length {len}");
            assert_eq!(crc32c_ports_delta(0, 0, len as u16), 0, "no change, length {len}");
        }
    }

    #[test]
    fn the_power_tables_are_powers_of_x() {
        // x^8 · x^8 = x^16, and the high table's step is 256 steps of the low one.
        assert_eq!(X8N_LOW[2], mul(X8, X8));
        assert_eq!(X8N_HIGH[1], mul(X8N_LOW[255], X8));
        assert_eq!(mul(X8N_LOW[17], X8N_HIGH[3]), {
            let mut p = X0;
            for _ in 0..(3 * 256 + 17) {
                p = mul(p, X8);
            }
            p
        });
    }

    #[test]
    fn chunk_types_map_to_conntrack_states() {
        assert_eq!(ct_flags_of(chunk::INIT), ct_flags::SYN);
        assert_eq!(ct_flags_of(chunk::COOKIE_ECHO), ct_flags::SYN);
        assert_eq!(ct_flags_of(0), ct_flags::ACK, "DATA");
        assert_eq!(ct_flags_of(11), ct_flags::ACK, "COOKIE ACK");
        assert_eq!(ct_flags_of(chunk::ABORT), ct_flags::FIN);
        assert_eq!(ct_flags_of(chunk::SHUTDOWN_COMPLETE), ct_flags::FIN);
    }
}
