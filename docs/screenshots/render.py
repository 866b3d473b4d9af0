"""Render an HTML report to PNG pages: WeasyPrint (HTML/CSS layout, no JavaScript) -> PDF -> pdfium raster."""
import sys
import pypdfium2 as pdfium
import weasyprint

src, out = sys.argv[1], sys.argv[2]
pdf = out + ".pdf"
weasyprint.HTML(filename=src).write_pdf(pdf)
doc = pdfium.PdfDocument(pdf)
for i in range(min(len(doc), int(sys.argv[3]) if len(sys.argv) > 3 else 2)):
    doc[i].render(scale=1.5).to_pil().save(f"{out}_p{i + 1}.png")
print(len(doc), "pages")
