// A minimal, safe Markdown renderer for CDS Hooks card details (GitHub-flavoured subset the service writes:
// paragraphs, "- " lists, "> " quotes, **bold**, _emphasis_, `code`, [links](https://...), backslash escapes).
// Everything is HTML-escaped first; only http(s) links are made; no raw HTML ever passes through.
"use strict";
(function (global) {
  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);

  function inline(text) {
    const held = [];
    const hold = (html) => "\u0000" + (held.push(html) - 1) + "\u0000";
    let s = text.replace(/\\([\\`*_{}\[\]()<>#+\-.!|])/g, (_, c) => hold(escapeHtml(c)));
    s = s.replace(/`([^`]+)`/g, (_, code) => hold("<code>" + escapeHtml(code) + "</code>"));
    s = s.replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g,
      (_, label, url) => hold('<a href="' + escapeHtml(url) + '" target="_blank" rel="noopener noreferrer">' +
        escapeHtml(label) + "</a>"));
    s = escapeHtml(s);
    s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[\s(])_([^_]+)_(?=$|[\s).,;:!?])/g, "$1<em>$2</em>");
    s = s.replace(/(^|[\s(])\*([^*]+)\*(?=$|[\s).,;:!?])/g, "$1<em>$2</em>");
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => held[Number(i)]);
  }

  function render(markdown) {
    const lines = String(markdown || "").replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let para = [], list = [], quote = [];
    const flush = () => {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      if (list.length) out.push("<ul>" + list.map((l) => "<li>" + inline(l) + "</li>").join("") + "</ul>");
      if (quote.length) out.push("<blockquote>" + quote.map(inline).join("<br>") + "</blockquote>");
      para = []; list = []; quote = [];
    };
    for (const line of lines) {
      if (!line.trim()) { flush(); continue; }
      let m;
      if ((m = /^\s*[-*] (.*)$/.exec(line))) { if (para.length || quote.length) flush(); list.push(m[1]); }
      else if ((m = /^> ?(.*)$/.exec(line))) { if (para.length || list.length) flush(); quote.push(m[1]); }
      else { if (list.length || quote.length) flush(); para.push(line); }
    }
    flush();
    return out.join("\n");
  }

  global.CdsMarkdown = { render, escapeHtml };
})(window);
