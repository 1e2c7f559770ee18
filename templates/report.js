/* robaudit report: makes tables sortable (the charts are static SVG).
   Progressive enhancement only: without JavaScript every table is still there,
   already sorted least-robust first. */
(function () {
  "use strict";

  function cellValue(row, column, type) {
    var cell = row.children[column];
    if (!cell) {
      return type === "number" ? -Infinity : "";
    }
    var raw = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
    if (type === "number") {
      var value = parseFloat(raw);
      return isNaN(value) ? -Infinity : value;
    }
    return raw.toLowerCase();
  }

  function sortTable(table, column, type, direction) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.forEach(function (row, position) {
      if (!row.hasAttribute("data-original")) {
        row.setAttribute("data-original", String(position));
      }
    });
    rows.sort(function (a, b) {
      var x = cellValue(a, column, type);
      var y = cellValue(b, column, type);
      if (x < y) { return -direction; }
      if (x > y) { return direction; }
      return Number(a.getAttribute("data-original")) - Number(b.getAttribute("data-original"));
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }

  function makeSortable(table) {
    var headers = table.tHead ? table.tHead.rows[table.tHead.rows.length - 1].cells : [];
    Array.prototype.forEach.call(headers, function (header, column) {
      var type = header.getAttribute("data-sort-type");
      if (!type) {
        return;
      }
      var button = document.createElement("button");
      button.type = "button";
      button.className = "sort-button";
      while (header.firstChild) {
        button.appendChild(header.firstChild);
      }
      header.appendChild(button);
      button.addEventListener("click", function () {
        var ascending = header.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(headers, function (other) { other.removeAttribute("aria-sort"); });
        header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        sortTable(table, column, type, ascending ? 1 : -1);
      });
    });
  }

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), makeSortable);
})();
