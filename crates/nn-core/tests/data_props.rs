//! Property tests of the binary readers: arbitrary bytes never panic, and valid arrays
//! round-trip.

use std::path::Path;

use nn_core::data::cifar::{parse_cifar10, parse_cifar100, Cifar100Labels};
use nn_core::data::idx::{parse_idx, IdxArray, IdxData};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn data_idx_arbitrary_bytes_never_panic(
        head in proptest::collection::vec(any::<u8>(), 0..24),
        tail in proptest::collection::vec(any::<u8>(), 0..256),
        zero_magic in any::<bool>(),
    ) {
        let mut b = head.clone();
        b.extend(&tail);
        if zero_magic && b.len() >= 2 {
            b[0] = 0;
            b[1] = 0;
        }
        if let Ok(a) = parse_idx(&b, Path::new("prop.idx")) {
            prop_assert_eq!(a.data.len(), a.dims.iter().product::<usize>());
        }
    }

    #[test]
    fn data_idx_roundtrip(dims in proptest::collection::vec(0usize..5, 1..4), seed in any::<u8>()) {
        let n: usize = dims.iter().product();
        let a = IdxArray { dims: dims.clone(), data: IdxData::I16((0..n).map(|i| (i as i16).wrapping_mul(seed as i16 + 1)).collect()) };
        prop_assert_eq!(parse_idx(&a.to_bytes().unwrap(), Path::new("rt.idx")).unwrap(), a);
    }

    #[test]
    fn data_cifar_arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..7000)) {
        let p = Path::new("prop.bin");
        let _ = parse_cifar10(&b, p);
        let _ = parse_cifar100(&b, p, Cifar100Labels::Fine);
        let _ = parse_cifar100(&b, p, Cifar100Labels::Coarse);
    }
}
