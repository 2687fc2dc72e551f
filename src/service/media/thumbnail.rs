//! Thumbnails: which of the fixed sizes answers a request, and making it. Thumbnails are only made
//! in these sizes (a client cannot make the server compute and store arbitrary sizes), never
//! larger than the original (no upscaling), and decoding is bounded so that a small file that
//! claims huge dimensions cannot exhaust memory.

use std::io::Cursor;

use image::{imageops::FilterType, DynamicImage, ImageFormat, ImageReader, Limits};

use crate::error::{ErrCode, Error, Result};

/// How a thumbnail is fitted to its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Fill the size exactly, cutting off what sticks out (the request's aspect ratio).
    Crop,
    /// Fit inside the size, keeping the original's aspect ratio.
    Scale,
}

impl Method {
    pub fn parse(s: Option<&str>) -> Result<Method> {
        match s {
            None | Some("scale") => Ok(Method::Scale),
            Some("crop") => Ok(Method::Crop),
            Some(_) => Err(Error::invalid_param("method must be crop or scale")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Crop => "crop",
            Method::Scale => "scale",
        }
    }
}

/// One of the sizes thumbnails are made in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub width: u32,
    pub height: u32,
    pub method: Method,
}

/// The sizes the spec suggests servers make.
pub const SIZES: [Size; 5] = [
    Size {
        width: 32,
        height: 32,
        method: Method::Crop,
    },
    Size {
        width: 96,
        height: 96,
        method: Method::Crop,
    },
    Size {
        width: 320,
        height: 240,
        method: Method::Scale,
    },
    Size {
        width: 640,
        height: 480,
        method: Method::Scale,
    },
    Size {
        width: 800,
        height: 600,
        method: Method::Scale,
    },
];

/// Largest width or height of an image we decode.
pub const MAX_DIMENSION: u32 = 10_000;
/// Most memory one decode may allocate.
pub const MAX_DECODE_ALLOC: u64 = 256 * 1024 * 1024;
/// Largest original we thumbnail (bytes); larger ones get 413 `M_TOO_LARGE`.
pub const MAX_SOURCE_BYTES: u64 = 50 * 1024 * 1024;

/// The size that answers a request for `width` x `height` with `method`: the smallest size of the
/// requested method that is at least as large as asked; else the smallest of any method that is;
/// else the largest there is.
pub fn choose(width: u32, height: u32, method: Method) -> Size {
    let covers = |s: &&Size| s.width >= width && s.height >= height;
    SIZES
        .iter()
        .filter(|s| s.method == method)
        .find(covers)
        .or_else(|| SIZES.iter().find(covers))
        .copied()
        .unwrap_or(SIZES[SIZES.len() - 1])
}

/// A made thumbnail.
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
}

/// Why no thumbnail could be made.
pub fn cannot_thumbnail() -> Error {
    Error::with_status(
        ErrCode::Unknown,
        http::StatusCode::BAD_REQUEST,
        "Cannot generate thumbnails for the requested content",
    )
}

fn too_large() -> Error {
    Error::new(ErrCode::TooLarge, "Content is too large to thumbnail")
}

/// Decode `original` (bounded) and make the thumbnail of `size`. JPEG originals give JPEG
/// thumbnails, everything else PNG (both may be served inline). Never animated: the first frame.
/// CPU-bound: call from a blocking thread.
pub fn make(original: &[u8], size: Size) -> Result<Thumbnail> {
    let reader = ImageReader::new(Cursor::new(original))
        .with_guessed_format()
        .map_err(|_| cannot_thumbnail())?;
    let format = reader.format().ok_or_else(cannot_thumbnail)?;
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::WebP
    ) {
        return Err(cannot_thumbnail());
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_DIMENSION);
    limits.max_image_height = Some(MAX_DIMENSION);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    let mut reader = reader;
    reader.limits(limits);
    let image = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => too_large(),
        _ => cannot_thumbnail(),
    })?;
    let resized = fit(&image, size);
    let (content_type, out_format, resized) = if format == ImageFormat::Jpeg {
        (
            "image/jpeg",
            ImageFormat::Jpeg,
            DynamicImage::ImageRgb8(resized.to_rgb8()),
        )
    } else {
        ("image/png", ImageFormat::Png, resized)
    };
    let mut bytes = Vec::new();
    resized
        .write_to(&mut Cursor::new(&mut bytes), out_format)
        .map_err(|e| Error::internal(format!("thumbnail encoding: {e}")))?;
    Ok(Thumbnail {
        bytes,
        content_type,
        width: resized.width(),
        height: resized.height(),
    })
}

/// Resize without ever enlarging.
fn fit(image: &DynamicImage, size: Size) -> DynamicImage {
    let (w, h) = (image.width(), image.height());
    match size.method {
        Method::Scale => {
            if w <= size.width && h <= size.height {
                image.clone()
            } else {
                image.resize(size.width, size.height, FilterType::Triangle)
            }
        }
        Method::Crop => {
            if w >= size.width && h >= size.height {
                image.resize_to_fill(size.width, size.height, FilterType::Triangle)
            } else {
                // Too small to fill: cut the largest centred piece of the requested aspect
                // ratio out of the original, at the original's resolution.
                let (cw, ch) = crop_box(w, h, size.width, size.height);
                image.crop_imm((w - cw) / 2, (h - ch) / 2, cw, ch)
            }
        }
    }
}

/// The largest `cw` x `ch` inside `w` x `h` with the aspect ratio `tw` : `th`.
fn crop_box(w: u32, h: u32, tw: u32, th: u32) -> (u32, u32) {
    let (w64, h64, tw64, th64) = (w as u64, h as u64, tw as u64, th as u64);
    if w64 * th64 > h64 * tw64 {
        // Wider than the target: full height.
        (((h64 * tw64) / th64).max(1) as u32, h)
    } else {
        (w, ((w64 * th64) / tw64).max(1) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([x as u8, y as u8, 7, 255]));
        let mut out = Vec::new();
        DynamicImage::ImageRgba8(img)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn choose_picks_the_smallest_covering_size() {
        assert_eq!(choose(32, 32, Method::Crop), SIZES[0]);
        assert_eq!(choose(40, 40, Method::Crop), SIZES[1]);
        assert_eq!(choose(1, 1, Method::Scale), SIZES[2]);
        assert_eq!(choose(321, 100, Method::Scale), SIZES[3]);
        assert_eq!(choose(800, 600, Method::Scale), SIZES[4]);
        // No crop size is large enough: the smallest scale size that is.
        assert_eq!(choose(200, 200, Method::Crop), SIZES[2]);
        // Nothing is large enough: the largest.
        assert_eq!(choose(4000, 4000, Method::Scale), SIZES[4]);
    }

    #[test]
    fn scale_keeps_aspect_and_never_enlarges() {
        let t = make(&png(1000, 500), SIZES[2]).unwrap();
        assert_eq!((t.width, t.height), (320, 160));
        assert_eq!(t.content_type, "image/png");
        let t = make(&png(100, 50), SIZES[4]).unwrap();
        assert_eq!((t.width, t.height), (100, 50));
    }

    #[test]
    fn crop_fills_the_size_or_cuts_the_aspect_ratio() {
        let t = make(&png(300, 200), SIZES[1]).unwrap();
        assert_eq!((t.width, t.height), (96, 96));
        let t = make(&png(60, 20), SIZES[1]).unwrap();
        assert_eq!((t.width, t.height), (20, 20));
        assert_eq!(crop_box(60, 20, 96, 96), (20, 20));
        assert_eq!(crop_box(20, 60, 4, 3), (20, 15));
    }

    #[test]
    fn non_images_and_huge_images_are_refused() {
        let e = make(b"hello, this is text", SIZES[0]).err().unwrap();
        assert_eq!(e.errcode(), "M_UNKNOWN");
        // A valid PNG header claiming 20000 x 20000 pixels.
        let mut huge = png(1, 1);
        huge[16..20].copy_from_slice(&20000u32.to_be_bytes());
        huge[20..24].copy_from_slice(&20000u32.to_be_bytes());
        let crc = crc32(&huge[12..29]);
        huge[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = make(&huge, SIZES[0]).err().unwrap();
        assert_eq!(e.errcode(), "M_TOO_LARGE");
    }
}
