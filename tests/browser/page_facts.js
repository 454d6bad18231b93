// What a page of the built book looks like once the browser has laid it out and MathJax has typeset it.
// test_book_pages.py runs this in the page; it returns plain data, and the Python side decides what fails.
// Elements are described as `tag#id.class "their text"` so that a failure names what to look at.

const COLUMN = "article.bd-article";  // sphinx-book-theme's content column: the chapter's text, cells and outputs
const SIDEBAR_NAV = "nav.bd-docs-nav";  // the left sidebar's table of contents
const CODE = "pre, code, script, style, textarea, mjx-container";  // text MathJax never reads as TeX
const RAW_TEX = /\\\(|\\\[|\$\$/g;  // what the TeX delimiters leave if MathJax has not replaced them
const SLACK_PX = 1;  // sub-pixel rounding of borders is not overflow
const FORMULA = "span.math, div.math";  // a formula as Sphinx writes it
const TYPESET_FORMULA = "mjx-math";  // what MathJax draws in its place
const SCREEN_READER_COPY = "mjx-assistive-mml";  // MathJax's invisible copy of a formula, for screen readers

// Part of a text. A slice may cut a character such as 𝑝 (two UTF-16 units) in half, which the driver
// cannot send back: toWellFormed() replaces such a half with U+FFFD.
function excerpt(text, start, end) {
  return text.slice(Math.max(0, start), end).toWellFormed();
}

function describe(element) {
  const id = element.id ? `#${element.id}` : "";
  const classes = [...element.classList].slice(0, 3).map((name) => `.${name}`).join("");
  const text = (element.innerText || element.getAttribute("src") || "").trim().replace(/\s+/g, " ");
  return `${element.tagName.toLowerCase()}${id}${classes} "${excerpt(text, 0, 80)}"`;
}

// An image the browser gave up on (finished, with no pixels) or is still waiting for.
function brokenImages() {
  return [...document.images]
    .filter((image) => !image.complete || image.naturalWidth === 0)
    .map((image) => `${image.getAttribute("src")} (alt "${image.alt}")${image.complete ? "" : ": still loading"}`);
}

// TeX delimiters still in the text outside code: formulas MathJax did not typeset, with some text around them.
function rawMath(column) {
  const copy = column.cloneNode(true);
  copy.querySelectorAll(CODE).forEach((element) => element.remove());
  const text = copy.textContent.replace(/\s+/g, " ");
  return [...text.matchAll(RAW_TEX)].map((match) => excerpt(text, match.index - 30, match.index + 50));
}

// A box with a sideways scroll bar. Source code may need one: its lines cannot be rewrapped without changing
// the code. Anything else in one (an output, a table, a formula) is wider than the column: the reader does not
// see it whole, and where scroll bars show only while scrolling, it looks cut off.
function scrollsSideways(element) {
  return ["auto", "scroll"].includes(getComputedStyle(element).overflowX);
}

function isSourceCode(element) {
  return element.closest(".cell_input") !== null ||
    (element.closest("div.highlight") !== null && element.closest(".cell_output") === null);
}

function scrollsWideContent(element) {
  return scrollsSideways(element) && element.scrollWidth > element.clientWidth + SLACK_PX && !isSourceCode(element);
}

function insideSidewaysScroller(element, column) {
  for (let parent = element.parentElement; parent && parent !== column; parent = parent.parentElement) {
    if (scrollsSideways(parent)) return true;
  }
  return false;
}

function sticksOut(element, edge) {
  const box = element.getBoundingClientRect();
  return box.width > 0 && (box.right > edge.right + SLACK_PX || box.left < edge.left - SLACK_PX);
}

// A box that hides what does not fit (an inline element has no box of its own to clip with). The theme clips
// formulas at the column's width; a formula's glyphs overhang their box by their italic slant, which is not
// cut off, so for a formula the typeset formula's box is measured rather than every glyph's.
function cutsOff(element) {
  const style = getComputedStyle(element);
  if (style.display === "inline" || !["hidden", "clip"].includes(style.overflowX)) return false;
  const formula = element.matches(FORMULA) ? element.querySelector(TYPESET_FORMULA) : null;
  const width = formula ? formula.getBoundingClientRect().width : element.scrollWidth;
  return width > element.clientWidth + SLACK_PX;
}

// Elements sticking out of the column, content cut off at their edge or scrolled sideways (not code); only the
// outermost of each.
function tooWide(column) {
  const edge = column.getBoundingClientRect();
  const found = [];
  for (const element of column.querySelectorAll("*")) {
    if (found.some((outer) => outer.contains(element)) || element.closest(SCREEN_READER_COPY)) continue;
    if (scrollsWideContent(element)) found.push(element);
    else if (!insideSidewaysScroller(element, column) && (sticksOut(element, edge) || cutsOff(element))) {
      found.push(element);
    }
  }
  return found.map((element) => {
    const box = element.getBoundingClientRect();
    return `${describe(element)}: ${Math.round(box.left)}..${Math.round(box.right)} px, content ` +
      `${element.scrollWidth} px wide, column ${Math.round(edge.left)}..${Math.round(edge.right)} px`;
  });
}

// The pages the sidebar links to, as absolute URLs without their #fragment.
function navLinks() {
  const nav = document.querySelector(SIDEBAR_NAV);
  return nav ? [...nav.querySelectorAll("a[href]")].map((link) => link.href.split("#")[0]) : [];
}

const column = document.querySelector(COLUMN);
return {
  hasColumn: column !== null,
  brokenImages: brokenImages(),
  rawMath: column ? rawMath(column) : [],
  tooWide: column ? tooWide(column) : [],
  navLinks: navLinks(),
};
