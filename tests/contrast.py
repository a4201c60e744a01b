"""WCAG 2 contrast of an element's text against what is drawn behind it, computed in the page.

``await contrast(locator)`` returns the ratio (1 to 21) for the element's computed ``color``
over its background: the element's and its ancestors' ``background-color`` layers,
composited from the first opaque one (white if none is), as the browser paints them. Any CSS
colour syntax works (``rgb()``, ``color(srgb ...)`` from ``color-mix()``, ``oklab()``): each
is painted on a 1x1 canvas and read back as sRGB bytes. Background images are not seen.
"""

from __future__ import annotations

CONTRAST_JS = """(el) => {
    const canvas = document.createElement('canvas');
    canvas.width = canvas.height = 1;
    const ctx = canvas.getContext('2d', { willReadFrequently: true });
    const rgba = (css) => {
        ctx.clearRect(0, 0, 1, 1);
        ctx.fillStyle = '#000';
        ctx.fillStyle = css;
        ctx.fillRect(0, 0, 1, 1);
        const [r, g, b, a] = ctx.getImageData(0, 0, 1, 1).data;
        return a ? [r, g, b, a / 255] : [0, 0, 0, 0];
    };
    const over = (top, below) => [0, 1, 2].map((i) => top[i] * top[3] + below[i] * (1 - top[3]));
    const layers = [];
    for (let node = el; node; node = node.parentElement) {
        const layer = rgba(getComputedStyle(node).backgroundColor);
        if (layer[3] > 0) layers.push(layer);
        if (layer[3] >= 1) break;
    }
    let bg = [255, 255, 255];
    for (const layer of layers.reverse()) bg = over(layer, bg);
    const fg = over(rgba(getComputedStyle(el).color), bg);
    const lum = (c) => {
        const [r, g, b] = c.map((v) => {
            const s = v / 255;
            return s <= 0.03928 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
        });
        return 0.2126 * r + 0.7152 * g + 0.0722 * b;
    };
    const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
    return (hi + 0.05) / (lo + 0.05);
}"""


async def contrast(locator) -> float:
    """The contrast ratio of ``locator``'s (first) element's text, see the module docstring."""
    return await locator.first.evaluate(CONTRAST_JS)
