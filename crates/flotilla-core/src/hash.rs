//! The one hash flotilla uses where two processes must agree on its output: placement
//! of stack replicas (every agent computes the same) and the lb's `hash` scheduler (two
//! lbs built apart send a key to the same backend). `std`'s `DefaultHasher` promises no
//! stable output across Rust releases, so it is named here and pinned by known answers:
//! 64-bit FNV-1a, then the 64-bit finaliser of MurmurHash3 so that nearby inputs spread
//! over the whole range (FNV alone leaves the high bits of short inputs correlated).

/// 64-bit FNV-1a of `bytes` (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// MurmurHash3's 64-bit finaliser (`fmix64`'s first half, as placement has always used).
pub fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// [`fnv1a64`] then [`mix64`]: the stable hash of `bytes`.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    mix64(fnv1a64(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_known_answers() {
        // The published FNV-1a 64-bit test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn stable_hash_known_answers() {
        // Pinned: a change here moves every replica and every hashed key.
        assert_eq!(stable_hash(b""), mix64(0xcbf2_9ce4_8422_2325));
        assert_eq!(stable_hash(b"web/0/node-a"), 0xe699_e368_80a4_1d94);
    }
}
