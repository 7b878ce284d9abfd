//! Event-time windows: assignment of a time to tumbling and sliding windows,
//! aligned to the epoch and half-open `[start, end)`. A window is complete when the
//! watermark reaches its end (no later record can have a time before it).

/// The window of size `size_ms` that holds `time_ms`, as `(start, end)`; `None`
/// if its end does not fit in `i64` (a time within `size_ms` of `i64::MAX`).
#[inline]
pub fn tumbling(time_ms: i64, size_ms: i64) -> Option<(i64, i64)> {
    let start = time_ms.checked_sub(time_ms.checked_rem_euclid(size_ms)?)?;
    Some((start, start.checked_add(size_ms)?))
}

/// Every sliding window (size `size_ms`, a new one every `slide_ms`) that holds
/// `time_ms`, earliest first; `None` if the edges of any of them do not fit in
/// `i64`.
pub fn sliding(
    time_ms: i64,
    size_ms: i64,
    slide_ms: i64,
) -> Option<impl Iterator<Item = (i64, i64)>> {
    let last_start = time_ms.checked_sub(time_ms.checked_rem_euclid(slide_ms)?)?;
    let count = size_ms.checked_add(slide_ms - 1)? / slide_ms;
    // The earliest start and the latest end must both fit.
    last_start.checked_sub((count - 1).checked_mul(slide_ms)?)?;
    last_start.checked_add(size_ms)?;
    Some(
        (0..count)
            .rev()
            .map(move |k| last_start - k * slide_ms)
            .filter(move |&start| start + size_ms > time_ms)
            .map(move |start| (start, start + size_ms)),
    )
}

/// Whether a window ending at `end_ms` may fire at `watermark_ms`.
#[inline]
pub fn complete(end_ms: i64, watermark_ms: i64) -> bool {
    watermark_ms >= end_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned_and_half_open() {
        type Case = (i64, i64, i64, &'static [(i64, i64)]);
        let cases: &[Case] = &[
            // time, size, slide, windows
            (0, 10, 10, &[(0, 10)]),
            (9, 10, 10, &[(0, 10)]),
            (10, 10, 10, &[(10, 20)]),
            (-1, 10, 10, &[(-10, 0)]),
            (
                10_000,
                10_000,
                2_000,
                &[
                    (2_000, 12_000),
                    (4_000, 14_000),
                    (6_000, 16_000),
                    (8_000, 18_000),
                    (10_000, 20_000),
                ],
            ),
            (
                11_999,
                10_000,
                2_000,
                &[
                    (2_000, 12_000),
                    (4_000, 14_000),
                    (6_000, 16_000),
                    (8_000, 18_000),
                    (10_000, 20_000),
                ],
            ),
            (
                12_000,
                10_000,
                2_000,
                &[
                    (4_000, 14_000),
                    (6_000, 16_000),
                    (8_000, 18_000),
                    (10_000, 20_000),
                    (12_000, 22_000),
                ],
            ),
        ];
        for &(time, size, slide, expected) in cases {
            let got: Vec<_> = sliding(time, size, slide).expect("fits").collect();
            assert_eq!(got, expected, "time {time} size {size} slide {slide}");
            if size == slide {
                assert_eq!(vec![tumbling(time, size).expect("fits")], expected);
            }
        }
        assert!(complete(10, 10) && !complete(10, 9));
    }

    #[test]
    fn windows_that_do_not_fit_in_i64_are_refused_not_wrapped() {
        assert_eq!(tumbling(i64::MAX, 10), None);
        assert_eq!(tumbling(i64::MAX - 5, 10), None);
        assert!(tumbling(i64::MIN, 10).is_none());
        assert_eq!(tumbling(i64::MAX - 20, 10).map(|w| w.1 > 0), Some(true));
        assert!(sliding(i64::MAX, 10_000, 2_000).is_none());
        assert!(sliding(i64::MIN + 5_000, 10_000, 2_000).is_none());
        assert!(sliding(i64::MIN + 20_000, 10_000, 2_000).is_some());
    }
}
