// The fallback provider's request body, for nginx's njs (js_import, js_set; nginx_fallback): the
// client's JSON with the fleet's model name replaced by the provider's, so that clients keep asking
// for the fleet's model. "" for a body that is not JSON or names another model: nginx then answers
// 503 and sends nothing to the provider. Written for njs 0.7.9 (Debian 12's).

// The body with its model renamed; the variables are set in the fallback location.
function rename(text, fleetModel, providerModel) {
    var request;
    try {
        request = JSON.parse(text);
    } catch (e) {
        return '';
    }
    if (!request || typeof request !== 'object' || Array.isArray(request) || request.model !== fleetModel) {
        return '';
    }
    request.model = providerModel;
    return JSON.stringify(request);
}

// js_set's handler. The body is in memory (client_body_in_single_buffer): nginx read it whole before it
// tried the instances.
function body(r) {
    var text;
    try {
        text = r.requestText;
    } catch (e) {
        return '';
    }
    if (typeof text !== 'string' || text === '') {
        return '';
    }
    return rename(text, r.variables.vllm_fleet_model, r.variables.vllm_fleet_fallback_model);
}

export default {body, rename};
