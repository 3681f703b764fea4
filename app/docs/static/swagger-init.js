// Swagger UI's start-up, in a file of ours so that the page's Content-Security-Policy needs no inline script.
// The settings are FastAPI's defaults for its own /docs page.
const container = document.getElementById("swagger-ui");

window.ui = SwaggerUIBundle({
  url: container.dataset.openapiUrl,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  // The online validator's badge is an image from another origin, which the policy refuses.
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
