// The prefix routing policy's key, for nginx's njs (js_import, js_set): the beginning of a request's
// prompt, so that requests sharing it land on the instance whose prefix cache already holds it.
// Written for njs 0.7.9 (Debian 12's), which has no optional chaining or nullish operators.

// /v1/chat/completions: the conversation's opening, the messages' text (a string, or the text parts of
// a content list) in order up to and with the first user message. Every later turn of a conversation
// repeats its opening, so the whole conversation keys to one instance; conversations that share only a
// system prompt key apart and spread out (each instance then holds that system prompt once).
function chatText(messages) {
    if (!Array.isArray(messages)) {
        return '';
    }
    var text = '';
    for (var i = 0; i < messages.length; i++) {
        var content = messages[i] && messages[i].content;
        if (typeof content === 'string') {
            text += content;
        } else if (Array.isArray(content)) {
            for (var j = 0; j < content.length; j++) {
                var part = content[j];
                if (part && part.type === 'text' && typeof part.text === 'string') {
                    text += part.text;
                }
            }
        }
        if (messages[i] && messages[i].role === 'user') {
            break;
        }
    }
    return text;
}

// /v1/completions: the prompt, a string or (a batch) its first item.
function completionText(prompt) {
    var first = Array.isArray(prompt) ? prompt[0] : prompt;
    return typeof first === 'string' ? first : '';
}

// The key of a request body for a route: its prompt's first `chars` characters; "" for a body that
// is not JSON or holds no prompt (nginx then sends the request to the least busy instance).
function keyOf(uri, body, chars) {
    var request;
    try {
        request = JSON.parse(body);
    } catch (e) {
        return '';
    }
    if (!request || typeof request !== 'object') {
        return '';
    }
    var text = uri === '/v1/chat/completions' ? chatText(request.messages)
        : uri === '/v1/completions' ? completionText(request.prompt) : '';
    return text.slice(0, chars);
}

// js_set's handler. The body is read only when nginx has it in memory (the routed locations keep it
// in one buffer); requestText throws for a body in a temporary file: no key then either.
function prefixKey(r) {
    var body;
    try {
        body = r.requestText;
    } catch (e) {
        return '';
    }
    if (typeof body !== 'string' || body === '') {
        return '';
    }
    return keyOf(r.uri, body, Number(r.variables.vllm_fleet_prefix_chars));
}

// The routed locations' content handler: njs reads the whole body before it runs this, so the upstream
// the key chooses is picked (in the named location) only once the body is there.
function route(r) {
    r.internalRedirect('@vllm_fleet_routed');
}

export default {prefixKey, route, keyOf};
