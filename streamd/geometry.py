"""Zone geometry in frame pixel coordinates: point-in-polygon and polygon/box overlap.

Shared by `streamd alert` (rules judged on published detections) and the daemon's object
events (zones an object visited), so it depends on nothing but the standard library.

Zones may be concave (an L-shaped platform edge, a U around a desk), so the overlap test
does not use a convex-only routine such as ``cv2.intersectConvexConvex``. Instead the zone
is clipped against the detection box with Sutherland-Hodgman: the *clip* region (the
axis-aligned box) is convex, which is all that algorithm needs, while the clipped
*subject* (the zone) may be any simple polygon. When a concave zone enters the box in
several places the clipped outline joins the pieces with zero-width edges along the box's
border; those contribute no area, so the shoelace area of the result is exactly the
intersection area. This is exact (no rasterisation error) and fast for the handful of
vertices a zone has.

A point within ``EDGE_EPS`` pixels of an edge counts as inside: a box standing exactly on a
zone's border line is in the zone, whichever way floating point rounds the border.
"""

from __future__ import annotations

import math
from typing import Sequence

Point = tuple[float, float]
Box = Sequence[float]   # [x1, y1, x2, y2]

EDGE_EPS = 1e-6


def polygon_area(poly: Sequence[Point]) -> float:
    """Unsigned area (shoelace formula)."""
    n = len(poly)
    twice = 0.0
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        twice += x1 * y2 - x2 * y1
    return abs(twice) / 2.0


def _distance_to_segment(p: Point, a: Point, b: Point) -> float:
    (px, py), (ax, ay), (bx, by) = p, a, b
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    if length2 == 0.0:
        return math.hypot(px - ax, py - ay)
    t = max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / length2))
    return math.hypot(px - (ax + t * dx), py - (ay + t * dy))


def point_in_polygon(p: Point, poly: Sequence[Point]) -> bool:
    """True when ``p`` is inside ``poly`` or on its border (within ``EDGE_EPS``)."""
    n = len(poly)
    for i in range(n):
        if _distance_to_segment(p, poly[i], poly[(i + 1) % n]) <= EDGE_EPS:
            return True
    # Even-odd ray cast to +x; the half-open rule (y1 > y) != (y2 > y) counts a vertex
    # the ray passes through exactly once.
    x, y = p
    inside = False
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        if (y1 > y) != (y2 > y):
            x_cross = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
            if x_cross > x:
                inside = not inside
    return inside


def _clip(poly: list[Point], inside: "_HalfPlane") -> list[Point]:
    out: list[Point] = []
    n = len(poly)
    for i in range(n):
        cur, nxt = poly[i], poly[(i + 1) % n]
        cur_in, nxt_in = inside.contains(cur), inside.contains(nxt)
        if cur_in:
            out.append(cur)
        if cur_in != nxt_in:
            out.append(inside.crossing(cur, nxt))
    return out


class _HalfPlane:
    """One side of a box edge: ``axis`` 0 (x) or 1 (y), keep values >= or <= ``limit``."""

    def __init__(self, axis: int, limit: float, keep_greater: bool) -> None:
        self.axis, self.limit, self.keep_greater = axis, limit, keep_greater

    def contains(self, p: Point) -> bool:
        return p[self.axis] >= self.limit if self.keep_greater else p[self.axis] <= self.limit

    def crossing(self, a: Point, b: Point) -> Point:
        t = (self.limit - a[self.axis]) / (b[self.axis] - a[self.axis])
        if self.axis == 0:
            return (self.limit, a[1] + t * (b[1] - a[1]))
        return (a[0] + t * (b[0] - a[0]), self.limit)


def intersection_area(poly: Sequence[Point], box: Box) -> float:
    """Area of the part of ``poly`` (any simple polygon) inside the box ``[x1, y1, x2, y2]``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    clipped: list[Point] = [(float(x), float(y)) for x, y in poly]
    for plane in (_HalfPlane(0, x1, True), _HalfPlane(0, x2, False),
                  _HalfPlane(1, y1, True), _HalfPlane(1, y2, False)):
        clipped = _clip(clipped, plane)
        if not clipped:
            return 0.0
    return polygon_area(clipped)


def overlap_fraction(poly: Sequence[Point], box: Box) -> float:
    """Fraction (0-1) of the box's area that lies inside ``poly``; 0 for an empty box."""
    x1, y1, x2, y2 = (float(v) for v in box)
    area = (x2 - x1) * (y2 - y1)
    if area <= 0:
        return 0.0
    return min(1.0, intersection_area(poly, box) / area)


def bottom_center(box: Box) -> Point:
    """Where a standing object touches the ground: the middle of the box's bottom edge."""
    x1, _, x2, y2 = (float(v) for v in box)
    return ((x1 + x2) / 2.0, y2)


def _orientation(a: Point, b: Point, c: Point) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def _on_segment(a: Point, b: Point, p: Point) -> bool:
    return min(a[0], b[0]) <= p[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= p[1] <= max(a[1], b[1])


def _segments_intersect(a: Point, b: Point, c: Point, d: Point) -> bool:
    o1, o2, o3, o4 = _orientation(a, b, c), _orientation(a, b, d), _orientation(c, d, a), _orientation(c, d, b)
    if ((o1 > 0) != (o2 > 0)) and o1 != 0 and o2 != 0 and ((o3 > 0) != (o4 > 0)) and o3 != 0 and o4 != 0:
        return True
    return ((o1 == 0 and _on_segment(a, b, c)) or (o2 == 0 and _on_segment(a, b, d))
            or (o3 == 0 and _on_segment(c, d, a)) or (o4 == 0 and _on_segment(c, d, b)))


def crossing_edges(poly: Sequence[Point]) -> tuple[int, int] | None:
    """Indices of two non-adjacent edges that touch or cross (edge i runs from point i to
    point i+1), or None for a simple polygon. Even-odd tests and the overlap area only
    mean what they say for simple polygons."""
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        for j in range(i + 1, n):
            if j == i + 1 or (i == 0 and j == n - 1):
                continue   # neighbours share a vertex by construction
            c, d = poly[j], poly[(j + 1) % n]
            if _segments_intersect(a, b, c, d):
                return i, j
    return None


def polygon_problem(poly: Sequence[Point]) -> str | None:
    """Why ``poly`` cannot be used as a zone, or None when it can (for config validators)."""
    if len(poly) < 3:
        return f"needs at least 3 points [x, y], got {len(poly)}"
    if polygon_area(poly) <= 0:
        return "encloses no area (its points are on one line)"
    edges = crossing_edges(poly)
    if edges is None:
        return None
    i, j = edges
    return (f"edges cross each other (points {i}->{(i + 1) % len(poly)} and {j}->{(j + 1) % len(poly)}); "
            "list the points in order around the area")


def segments_intersect(a: Point, b: Point, c: Point, d: Point) -> bool:
    """Whether segment a-b touches or crosses segment c-d (a line crossing's motion vs the line)."""
    return _segments_intersect(a, b, c, d)


def side_of_line(p: Point, a: Point, b: Point) -> int:
    """Which side of the line a->b the point is on: 1, -1, or 0 when on it."""
    o = _orientation(a, b, p)
    return (o > 0) - (o < 0)
